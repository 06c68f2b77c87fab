// moorline's service worker: keeps the app shell so the app opens offline (or on a flaky
// link) and shows what it last knew. Network first: a reachable server always serves the
// current build. Only the shell is cached; the API, /events and WebSockets are never touched.
importScripts('app/sw-push.js');

const CACHE = 'moorline-__BUILD__';
const SHELL = [
  './',
  'app/app.js',
  'app/api.js',
  'app/conversation.js',
  'app/markdown.js',
  'app/notify.js',
  'app/sw-push.js',
  'app/app.css',
  'app/vendor/preact-htm.js',
  'app/icon.svg',
  'app/manifest.webmanifest',
];

self.addEventListener('install', (event) => {
  event.waitUntil(
    caches
      .open(CACHE)
      .then((cache) =>
        cache.addAll(SHELL.map((u) => new Request(u, { headers: { accept: 'text/html,*/*' } }))),
      )
      .then(() => self.skipWaiting()),
  );
});

self.addEventListener('activate', (event) => {
  event.waitUntil(
    caches
      .keys()
      .then((keys) => Promise.all(keys.filter((k) => k !== CACHE).map((k) => caches.delete(k))))
      .then(() => self.clients.claim()),
  );
});

self.addEventListener('fetch', (event) => {
  const req = event.request;
  if (req.method !== 'GET') return;
  const url = new URL(req.url);
  const scope = new URL(self.registration.scope);
  if (url.origin !== scope.origin) return;
  const path = url.pathname.slice(scope.pathname.length - 1);
  const shell = req.mode === 'navigate' ? path === '/' : path.startsWith('/app/');
  if (!shell) return;
  event.respondWith(
    fetch(req)
      .then((resp) => {
        if (resp.ok) {
          const copy = resp.clone();
          caches.open(CACHE).then((c) => c.put(req.mode === 'navigate' ? './' : req, copy));
        }
        return resp;
      })
      .catch(() => caches.match(req.mode === 'navigate' ? './' : req).then((r) => r || Response.error())),
  );
});
