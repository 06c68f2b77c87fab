// The service worker's half of notifications (see notify.js): shows what moorline pushed and
// opens the session on a click. Loaded by sw.js with importScripts('app/sw-push.js').
//
// The payload (decrypted by the browser) is moorline's JSON: {title, body, trigger,
// sessionId, url: "#/s/<id>", tag, requestId?}.

self.addEventListener('push', (event) => {
  let data = {};
  try {
    data = event.data ? event.data.json() : {};
  } catch {
    data = { body: event.data ? event.data.text() : '' };
  }
  const title = data.title || 'moorline';
  event.waitUntil(
    self.registration.showNotification(title, {
      body: data.body || '',
      // One notification per request or run: a repeat replaces, never piles up.
      tag: data.tag || data.sessionId || 'moorline',
      renotify: data.trigger === 'awaiting_input',
      requireInteraction: data.trigger === 'awaiting_input',
      icon: 'app/icon-192.png',
      badge: 'app/icon-192.png',
      data: { url: data.url || '#/', sessionId: data.sessionId },
    }),
  );
});

self.addEventListener('notificationclick', (event) => {
  event.notification.close();
  const scope = self.registration.scope;
  const target = new URL(event.notification.data && event.notification.data.url ? event.notification.data.url : '#/', scope).href;
  event.waitUntil(
    self.clients.matchAll({ type: 'window', includeUncontrolled: true }).then((windows) => {
      // An open window of the app goes to the session; otherwise a new one opens there.
      for (const w of windows) {
        if (w.url.startsWith(scope) && 'focus' in w) {
          return w.navigate(target).then((c) => (c || w).focus()).catch(() => w.focus());
        }
      }
      return self.clients.openWindow(target);
    }),
  );
});
