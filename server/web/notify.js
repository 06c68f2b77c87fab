// Notifications for the web app: a toggle that asks the browser's permission and subscribes
// it to moorline's Web Push (VAPID key from GET push/web/key, subscription to
// POST push/web/subscriptions), or unsubscribes it. The service worker's half is sw-push.js.
//
// Hook-in: `import { NotificationToggle } from './notify.js'` and render
// html`<${NotificationToggle} base=${host.base} />` (base: the server's URL, ending in '/');
// in sw.js, `importScripts('app/sw-push.js')` (or paste its two listeners).
import { html, useEffect, useState } from './vendor/preact-htm.js';

/** Whether this browser can receive Web Push from this page (a secure context is required). */
export function pushSupported() {
  return (
    window.isSecureContext &&
    'serviceWorker' in navigator &&
    'PushManager' in window &&
    'Notification' in window
  );
}

/** The VAPID public key (base64url) as the bytes PushManager.subscribe wants. */
function keyBytes(base64url) {
  const b64 = base64url.replace(/-/g, '+').replace(/_/g, '/');
  const raw = atob(b64 + '='.repeat((4 - (b64.length % 4)) % 4));
  return Uint8Array.from(raw, (c) => c.charCodeAt(0));
}

async function call(base, method, path, body) {
  const resp = await fetch(new URL(path, base), {
    method,
    headers: body ? { 'content-type': 'application/json' } : {},
    body: body ? JSON.stringify(body) : undefined,
    credentials: 'same-origin',
  });
  if (!resp.ok && resp.status !== 204) {
    let why = `${resp.status}`;
    try {
      const err = await resp.json();
      why = err.message || err.error || why;
    } catch {}
    throw new Error(why);
  }
  return resp.status === 204 ? null : resp.json();
}

/** 'on', 'off', 'denied' (the browser said no) or 'unsupported'. */
export async function notificationState() {
  if (!pushSupported()) return 'unsupported';
  if (Notification.permission === 'denied') return 'denied';
  const reg = await navigator.serviceWorker.getRegistration();
  const sub = reg && (await reg.pushManager.getSubscription());
  return sub && Notification.permission === 'granted' ? 'on' : 'off';
}

/** Asks for permission, subscribes, and registers the subscription with the server. */
export async function enableNotifications(base) {
  if (!pushSupported()) throw new Error('this browser cannot receive notifications here');
  const permission = await Notification.requestPermission();
  if (permission !== 'granted') throw new Error('notifications were not allowed');
  const { publicKey } = await call(base, 'GET', 'push/web/key');
  const reg = await navigator.serviceWorker.ready;
  let sub = await reg.pushManager.getSubscription();
  if (sub) {
    // A subscription made with another server key cannot be used: start again.
    const current = sub.options && sub.options.applicationServerKey;
    const want = keyBytes(publicKey);
    const same = current && new Uint8Array(current).every((b, i) => b === want[i]);
    if (!same) {
      await sub.unsubscribe();
      sub = null;
    }
  }
  if (!sub) {
    sub = await reg.pushManager.subscribe({
      userVisibleOnly: true,
      applicationServerKey: keyBytes(publicKey),
    });
  }
  await call(base, 'POST', 'push/web/subscriptions', sub.toJSON());
}

/** Unregisters this browser's subscription with the server, then drops it. */
export async function disableNotifications(base) {
  const reg = await navigator.serviceWorker.getRegistration();
  const sub = reg && (await reg.pushManager.getSubscription());
  if (!sub) return;
  await call(base, 'DELETE', 'push/web/subscriptions', { endpoint: sub.endpoint });
  await sub.unsubscribe();
}

/** A "Notifications" switch for the header or settings. */
export function NotificationToggle({ base }) {
  const [state, setState] = useState('…');
  const [error, setError] = useState('');
  useEffect(() => {
    notificationState().then(setState, () => setState('unsupported'));
  }, []);
  const flip = async () => {
    setError('');
    const was = state;
    setState('…');
    try {
      if (was === 'on') await disableNotifications(base);
      else await enableNotifications(base);
      setState(await notificationState());
    } catch (e) {
      setError(String(e.message || e));
      setState(await notificationState().catch(() => was));
    }
  };
  if (state === 'unsupported') return null;
  return html`<label class="notify-toggle" title=${error || 'Tell me when an agent needs me'}>
    <input
      type="checkbox"
      role="switch"
      checked=${state === 'on'}
      disabled=${state === '…' || state === 'denied'}
      onChange=${flip}
    />
    Notifications${state === 'denied' ? ' (blocked in the browser)' : ''}
    ${error && html`<span class="error">${error}</span>`}
  </label>`;
}
