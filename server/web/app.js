// moorline's web app: sessions, a new-session form, and a session's conversation with its
// approvals. Preact + htm as one vendored file; no build step. Every request goes to the
// host the page came from; a `Host` is a base URL, so more hosts can be added later.

import {
  html,
  render,
  useState,
  useEffect,
  useLayoutEffect,
  useReducer,
  useRef,
  useMemo,
  useCallback,
} from './vendor/preact-htm.js';
import { Host, answerFor, describeRequest, requestId } from './api.js';
import { Conversation } from './conversation.js';
import { markdown } from './markdown.js';
import { NotificationToggle } from './notify.js';

// ---------------------------------------------------------------------------------------
// State shared by the views: the host's sessions, kept live from GET /events.

class SessionStore {
  constructor(host) {
    this.host = host;
    this.sessions = new Map();
    this.lastActivity = new Map();
    this.state = 'connecting';
    this.loaded = false;
    this.listeners = new Set();
    this.stop = host.events(
      (event) => this.apply(event),
      (state) => {
        this.state = state;
        this.emit();
      },
    );
  }

  apply(event) {
    if (event.type === 'snapshot') {
      this.sessions = new Map(event.sessions.map((s) => [s.id, s]));
      this.loaded = true;
    } else if (event.type === 'session_deleted') {
      this.sessions.delete(event.sessionId);
    } else if (event.session) {
      this.sessions.set(event.sessionId, event.session);
      this.lastActivity.set(event.sessionId, event.at);
    }
    this.emit();
  }

  emit() {
    for (const f of this.listeners) f();
  }

  subscribe(f) {
    this.listeners.add(f);
    return () => this.listeners.delete(f);
  }

  list() {
    return [...this.sessions.values()];
  }
}

function useStore(store) {
  const [, bump] = useReducer((n) => n + 1, 0);
  useEffect(() => store.subscribe(bump), [store]);
  return store;
}

// ---------------------------------------------------------------------------------------
// Small helpers.

function useHash() {
  const [hash, setHash] = useState(location.hash);
  useEffect(() => {
    const on = () => setHash(location.hash);
    window.addEventListener('hashchange', on);
    return () => window.removeEventListener('hashchange', on);
  }, []);
  return hash;
}

function go(hash) {
  location.hash = hash;
}

function ago(ms) {
  if (!ms) return '';
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 45) return 'just now';
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${Math.round(s / 3600)} h ago`;
  return `${Math.round(s / 86400)} d ago`;
}

function useTick(ms) {
  const [, bump] = useReducer((n) => n + 1, 0);
  useEffect(() => {
    const t = setInterval(bump, ms);
    return () => clearInterval(t);
  }, [ms]);
}

function title(s) {
  return s.name || s.id;
}

function agentLabel(s) {
  return s.agent === s.instanceId ? s.agent : `${s.agent} · ${s.instanceId}`;
}

function shortPath(p) {
  if (!p) return '';
  const parts = p.split('/').filter(Boolean);
  return parts.length > 3 ? `…/${parts.slice(-2).join('/')}` : p;
}

const ACTIVITY_LABEL = { waiting: 'waiting for you', working: 'working', idle: 'idle' };

function StatusBadges({ s }) {
  return html`<span class="badges">
    <span class=${`badge status-${s.status}`}>${s.status}</span>
    ${s.activity &&
    html`<span class=${`badge activity-${s.activity}`}>${ACTIVITY_LABEL[s.activity] ?? s.activity}</span>`}
  </span>`;
}

/** Sends `answer` from outside the session view: a short-lived WebSocket. */
function answerOnce(host, sessionId, request, answer) {
  return new Promise((resolve, reject) => {
    const url = host.url(`/sessions/${sessionId}`);
    url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
    url.search = '?hello=1';
    const ws = new WebSocket(url);
    const timer = setTimeout(() => {
      ws.close();
      reject(new Error('No answer from the server.'));
    }, 10000);
    ws.onmessage = (m) => {
      const frame = JSON.parse(m.data);
      if (frame.type === 'amarre.hello') ws.send(JSON.stringify(answer));
      if (frame.type === 'amarre.approval_resolved' && String(frame.id) === requestId(request)) {
        clearTimeout(timer);
        ws.close(1000);
        resolve(frame);
      }
    };
    ws.onerror = () => {
      clearTimeout(timer);
      reject(new Error('Cannot reach the session.'));
    };
  });
}

// ---------------------------------------------------------------------------------------
// The header.

const THEMES = ['auto', 'light', 'dark'];

function applyTheme(theme) {
  if (theme === 'auto') delete document.documentElement.dataset.theme;
  else document.documentElement.dataset.theme = theme;
}

function Header({ store, me, host }) {
  useStore(store);
  const [theme, setTheme] = useState(() => localStorage.getItem('moorline.theme') || 'auto');
  useEffect(() => {
    applyTheme(theme);
    localStorage.setItem('moorline.theme', theme);
  }, [theme]);
  const next = THEMES[(THEMES.indexOf(theme) + 1) % THEMES.length];
  const live = store.state === 'live';
  return html`<header class="top">
    <a class="brand" href="#/" aria-label="moorline: all sessions">
      <img src="app/icon.svg" alt="" width="28" height="28" />
      <span>moorline</span>
    </a>
    <span class=${`conn ${live ? 'live' : 'off'}`} role="status" title=${live ? 'Live' : 'Reconnecting'}>
      <span class="dot" aria-hidden="true"></span>
      <span class="sr-only">${live ? 'Connected' : 'Reconnecting'}</span>
    </span>
    <span class="spacer"></span>
    ${me && html`<span class="me" title=${`Signed in as ${me.user}`}>${me.name || me.user}</span>`}
    <${NotificationToggle} base=${host.base} />
    <button class="icon" type="button" onClick=${() => setTheme(next)} aria-label=${`Theme: ${theme}. Switch to ${next}`}>
      ${theme === 'dark' ? '☾' : theme === 'light' ? '☀' : '◐'}
    </button>
  </header>`;
}

// ---------------------------------------------------------------------------------------
// Sessions, with everything waiting for an answer first.

function NeedsYou({ store, host }) {
  const pending = [];
  for (const s of store.list()) {
    if (s.status !== 'running') continue;
    for (const request of s.pendingApprovals ?? []) pending.push({ s, request });
  }
  if (!pending.length) return null;
  return html`<section class="needs-you" aria-labelledby="needs-you-h">
    <h2 id="needs-you-h">Needs you <span class="count">${pending.length}</span></h2>
    ${pending.map(
      ({ s, request }) =>
        html`<${ApprovalCard}
          key=${`${s.id}:${requestId(request)}`}
          session=${s}
          request=${request}
          onAnswer=${(answer) => answerOnce(host, s.id, request, answer)}
        />`,
    )}
  </section>`;
}

function SessionList({ store, host }) {
  useStore(store);
  useTick(30000);
  const sessions = store.list();
  const waiting = sessions.filter((s) => s.activity === 'waiting').length;
  useEffect(() => {
    document.title = waiting ? `(${waiting}) moorline` : 'moorline';
  }, [waiting]);
  // Waiting first, then running, newest first within each.
  const rank = (s) => (s.activity === 'waiting' ? 0 : s.status === 'running' ? 1 : 2);
  sessions.sort((a, b) => rank(a) - rank(b) || b.createdAt - a.createdAt);
  return html`<main id="main" class="list">
    <${NeedsYou} store=${store} host=${host} />
    <section aria-labelledby="sessions-h">
      <div class="section-head">
        <h2 id="sessions-h">Sessions</h2>
        <a class="button primary" href="#/new">New session</a>
      </div>
      ${!store.loaded && html`<p class="muted">Loading…</p>`}
      ${store.loaded && !sessions.length && html`<p class="muted empty">No sessions yet. Start one with <strong>New session</strong>.</p>`}
      <ul class="sessions">
        ${sessions.map((s) => {
          const last = store.lastActivity.get(s.id) || s.spawnedAt || s.createdAt;
          const pending = s.pendingApprovals?.length ?? 0;
          return html`<li key=${s.id} class=${`session-row ${s.activity === 'waiting' ? 'waiting' : ''}`} data-id=${s.id}>
            <a href=${`#/s/${s.id}`}>
              <span class="row-top">
                <span class="name">${title(s)}</span>
                <${StatusBadges} s=${s} />
              </span>
              <span class="row-meta">
                <span>${agentLabel(s)}</span>
                <span title=${s.cwd}>${shortPath(s.cwd)}</span>
                ${pending > 0 && html`<span class="pending">${pending} pending</span>`}
                <span>${ago(last)}</span>
                ${s.createdBy && html`<span>by ${s.createdBy}</span>`}
              </span>
            </a>
          </li>`;
        })}
      </ul>
    </section>
  </main>`;
}

// ---------------------------------------------------------------------------------------
// New session.

function recentCwds(instance) {
  try {
    return JSON.parse(localStorage.getItem(`moorline.cwds.${instance}`) || '[]');
  } catch {
    return [];
  }
}

function rememberCwd(instance, cwd) {
  if (!cwd) return;
  const list = [cwd, ...recentCwds(instance).filter((c) => c !== cwd)].slice(0, 8);
  localStorage.setItem(`moorline.cwds.${instance}`, JSON.stringify(list));
}

function NewSession({ host, instances }) {
  const usable = instances.filter((i) => i.available);
  const [instanceId, setInstance] = useState(() => (usable[0] || instances[0])?.id ?? '');
  const [cwd, setCwd] = useState('');
  const [projects, setProjects] = useState([]);
  const [projectId, setProject] = useState('');
  const [branch, setBranch] = useState('');
  useEffect(() => {
    host.projects().then(setProjects, () => setProjects([]));
  }, []);
  const project = projects.find((p) => p.id === projectId);
  const [name, setName] = useState('');
  const [error, setError] = useState(null);
  const [busy, setBusy] = useState(false);
  const instance = instances.find((i) => i.id === instanceId);
  useEffect(() => {
    if (!instanceId && instances.length) setInstance((usable[0] || instances[0]).id);
  }, [instances]);
  const offered = instance ? [...recentCwds(instance.id), ...(instance.workspaceRoots || [])] : [];
  const submit = async (e) => {
    e.preventDefault();
    setBusy(true);
    setError(null);
    try {
      const body = { instanceId };
      if (project) {
        body.project = project.id;
        if (branch.trim()) body.branch = branch.trim();
      } else if (cwd.trim()) body.cwd = cwd.trim();
      if (name.trim()) body.name = name.trim();
      const s = await host.create(body);
      if (!project) rememberCwd(instanceId, s.cwd);
      go(`#/s/${s.id}`);
    } catch (err) {
      setError(err.message);
    } finally {
      setBusy(false);
    }
  };
  return html`<main id="main" class="form-page">
    <h2>New session</h2>
    <form onSubmit=${submit} class="new-session">
      <label for="instance">Instance</label>
      <select id="instance" value=${instanceId} onChange=${(e) => setInstance(e.target.value)} required>
        ${instances.map(
          (i) => html`<option value=${i.id} disabled=${!i.available}>
            ${i.id} — ${i.agent}, ${i.runtime}${i.available ? '' : ` (unavailable: ${i.reason})`}
          </option>`,
        )}
      </select>
      ${instance &&
      html`<p class="hint" id="instance-hint">
        ${instance.agent} agent in the ${instance.runtime} runtime, ${instance.dialect} dialect.
        ${instance.workspaceRoots?.length
          ? ` Working directories inside ${instance.workspaceRoots.join(', ')}.`
          : ' Runs in its configured directory.'}
      </p>`}
      ${projects.length > 0 &&
      html`<label for="project">Project</label>
        <select id="project" value=${projectId} onChange=${(e) => setProject(e.target.value)}>
          <option value="">None: choose a working directory</option>
          ${projects.map((p) => html`<option value=${p.id}>${p.id} — ${shortPath(p.path)}</option>`)}
        </select>
        ${project &&
        html`<p class="hint">A worktree of its own on a new branch from ${project.defaultBranch}.</p>
          <label for="branch">Branch <span class="muted">(optional)</span></label>
          <input
            id="branch"
            value=${branch}
            onInput=${(e) => setBranch(e.target.value)}
            placeholder="moorline/<session id>"
            autocomplete="off"
            spellcheck="false"
          />`}`}
      ${!project &&
      html`<label for="cwd">Working directory</label>
        <input
          id="cwd"
          list="cwds"
          value=${cwd}
          onInput=${(e) => setCwd(e.target.value)}
          placeholder=${instance?.workspaceRoots?.[0] ?? 'the instance default'}
          disabled=${!instance?.workspaceRoots?.length}
          autocomplete="off"
          spellcheck="false"
        />`}
      <datalist id="cwds">${[...new Set(offered)].map((c) => html`<option value=${c} />`)}</datalist>
      <label for="name">Name <span class="muted">(optional)</span></label>
      <input id="name" value=${name} onInput=${(e) => setName(e.target.value)} maxlength="256" autocomplete="off" />
      ${error && html`<p class="error" role="alert">${error}</p>`}
      <div class="actions">
        <a class="button" href="#/">Cancel</a>
        <button class="primary" type="submit" disabled=${busy || !instance}>${busy ? 'Creating…' : 'Create'}</button>
      </div>
    </form>
  </main>`;
}

// ---------------------------------------------------------------------------------------
// Approval cards (in the list and in a conversation).

function resolutionText(r) {
  const verb = r.decision === 'allow' ? 'Allowed' : r.decision === 'deny' ? 'Denied' : 'Answered';
  if (r.by === 'client') return `${verb} by ${r.user || 'a client'}`;
  if (r.by === 'timeout') return `${verb}: nobody answered in time`;
  if (r.by === 'policy') return `${verb} by policy${r.tool ? ` (${r.tool} needs no approval)` : ''}`;
  return `${verb} (${r.by})`;
}

/** The controls that answer `request`: Allow/Deny, or a pi dialog's choices or text. */
function Answers({ request, busy, answer }) {
  const [value, setValue] = useState('');
  const method = request.type === 'extension_ui_request' ? request.method : 'confirm';
  const reply = (fields) => answer({ type: 'extension_ui_response', id: request.id, ...fields });
  if (method === 'select' && Array.isArray(request.options)) {
    return html`<div class="approval-actions choices">
      ${request.options.map(
        (o) => html`<button type="button" disabled=${busy} onClick=${() => reply({ value: String(o) })}>${String(o)}</button>`,
      )}
      <button type="button" class="deny" disabled=${busy} onClick=${() => reply({ cancelled: true })}>Dismiss</button>
    </div>`;
  }
  if (method === 'input' || method === 'editor') {
    return html`<form class="approval-actions" onSubmit=${(e) => {
      e.preventDefault();
      reply({ value });
    }}>
      <input aria-label="Answer" value=${value} placeholder=${request.placeholder ?? ''} onInput=${(e) => setValue(e.target.value)} />
      <button type="submit" class="primary" disabled=${busy}>Answer</button>
      <button type="button" class="deny" disabled=${busy} onClick=${() => reply({ cancelled: true })}>Dismiss</button>
    </form>`;
  }
  const allow = answerFor(request, true);
  if (!allow) return html`<p class="muted">Answer this in the raw view.</p>`;
  return html`<div class="approval-actions">
    <button type="button" class="allow" disabled=${busy} onClick=${() => answer(allow)}>Allow</button>
    <button type="button" class="deny" disabled=${busy} onClick=${() => answer(answerFor(request, false))}>Deny</button>
  </div>`;
}

function ApprovalCard({ session, request, resolution, onAnswer, live = true }) {
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState(null);
  const { tool, detail } = describeRequest(request);
  const state = resolution ? resolution.decision : 'pending';
  const answer = async (value) => {
    setBusy(true);
    setError(null);
    try {
      await onAnswer(value);
    } catch (e) {
      setError(e.message);
    } finally {
      setBusy(false);
    }
  };
  return html`<article class="approval" data-state=${state} data-request=${requestId(request)} aria-label=${`Approval: ${tool}`}>
    <div class="approval-head">
      <span class="approval-tool">${tool}</span>
      ${session && html`<a class="approval-session" href=${`#/s/${session.id}`}>${title(session)}</a>`}
    </div>
    ${detail && html`<pre class="approval-detail">${detail}</pre>`}
    ${resolution
      ? html`<p class="resolution" role="status">${resolutionText(resolution)}</p>`
      : live
        ? html`<${Answers} request=${request} busy=${busy} answer=${answer} />`
        : html`<p class="muted">Not answered; the agent is not running.</p>`}
    ${error && html`<p class="error" role="alert">${error}</p>`}
  </article>`;
}

// ---------------------------------------------------------------------------------------
// A session.

const FOLD_LINES = 12;

function Folded({ text, className }) {
  const [open, setOpen] = useState(false);
  const lines = text.split('\n');
  if (lines.length <= FOLD_LINES || open) return html`<pre class=${className}>${text}</pre>`;
  return html`<div>
    <pre class=${className}>${lines.slice(0, FOLD_LINES).join('\n')}</pre>
    <button type="button" class="link" onClick=${() => setOpen(true)}>Show all ${lines.length} lines</button>
  </div>`;
}

function toolSummary(item) {
  const a = item.args || {};
  const main = a.command ?? a.path ?? a.file_path ?? a.pattern ?? a.url;
  return main !== undefined ? String(main) : '';
}

function Item({ item, session, socket, running }) {
  switch (item.kind) {
    case 'user':
      return html`<div class="msg user"><div class="who">You</div><div class="body plain">${item.text}${item.images ? html`<span class="muted"> (+${item.images} image${item.images > 1 ? 's' : ''})</span>` : ''}</div></div>`;
    case 'assistant':
      if (!item.blocks.length && !item.error && !item.streaming) return null;
      return html`<div class=${`msg assistant ${item.streaming ? 'streaming' : ''}`}>
        ${item.blocks.map((b) =>
          b.type === 'thinking'
            ? html`<details class="thinking"><summary>Thinking</summary><div class="plain">${b.text}</div></details>`
            : html`<div class="body md">${markdown(b.text)}</div>`,
        )}
        ${item.error && html`<p class="error" role="alert">${item.error}</p>`}
      </div>`;
    case 'tool':
      return html`<details class=${`tool ${item.done ? (item.isError ? 'failed' : 'ok') : 'running'}`}>
        <summary>
          <span class="tool-name">${item.name}</span>
          <span class="tool-arg">${toolSummary(item)}</span>
          <span class="tool-state">${item.done ? (item.isError ? 'error' : 'done') : 'running…'}</span>
        </summary>
        <${Folded} className="tool-args" text=${JSON.stringify(item.args ?? {}, null, 2)} />
        ${item.output && html`<${Folded} className="tool-output" text=${item.output} />`}
      </details>`;
    case 'approval':
      return html`<${ApprovalCard}
        request=${item.request}
        resolution=${item.resolution}
        live=${running}
        onAnswer=${async (answer) => {
          if (!socket.send(answer)) throw new Error('Not connected; try again in a moment.');
        }}
      />`;
    case 'turn_end':
      return html`<hr class="turn-end" aria-label="End of turn" />`;
    case 'notice':
      return html`<p class=${`notice ${item.level}`} role=${item.level === 'error' ? 'alert' : 'status'}>${item.text}</p>`;
    default:
      return null;
  }
}

function readImage(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => {
      const url = String(reader.result);
      resolve({ type: 'image', data: url.slice(url.indexOf(',') + 1), mimeType: file.type || 'image/png' });
    };
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

function Composer({ socket, working, running, raw, images }) {
  const [text, setText] = useState('');
  const [files, setFiles] = useState([]);
  const [error, setError] = useState(null);
  const area = useRef(null);
  const fine = useMemo(() => window.matchMedia('(pointer: fine)').matches, []);
  const send = async (kind) => {
    const message = text.trim();
    if (!message && !files.length) return;
    setError(null);
    let ok;
    if (raw) {
      ok = socket.send(text);
    } else {
      const cmd = { id: `w${Date.now().toString(36)}`, type: kind, message };
      if (files.length) cmd.images = await Promise.all(files.map(readImage));
      ok = socket.send(cmd);
    }
    if (!ok) {
      setError('Not connected; your message is kept. Try again in a moment.');
      return;
    }
    setText('');
    setFiles([]);
    area.current?.focus();
  };
  const primary = working ? 'follow_up' : 'prompt';
  const onKey = (e) => {
    if (e.key === 'Enter' && (e.ctrlKey || e.metaKey || (fine && !e.shiftKey))) {
      e.preventDefault();
      send(primary);
    }
  };
  if (!running)
    return html`<div class="composer off"><p class="muted">The agent is not running.</p></div>`;
  return html`<form class="composer" onSubmit=${(e) => {
    e.preventDefault();
    send(primary);
  }}>
    ${files.length > 0 &&
    html`<div class="attachments">
      ${files.map((f, i) => html`<span class="chip">${f.name}<button type="button" class="link" aria-label=${`Remove ${f.name}`} onClick=${() => setFiles(files.filter((_, j) => j !== i))}>×</button></span>`)}
    </div>`}
    ${error && html`<p class="error" role="alert">${error}</p>`}
    <div class="composer-row">
      ${images &&
      !raw &&
      html`<label class="button icon attach" title="Attach images">
        <svg aria-hidden="true" viewBox="0 0 24 24" width="22" height="22" fill="none" stroke="currentColor" stroke-width="2" stroke-linecap="round" stroke-linejoin="round"><path d="M21 11.5l-8.6 8.6a5.5 5.5 0 0 1-7.8-7.8l8.6-8.6a3.7 3.7 0 0 1 5.2 5.2l-8.6 8.6a1.8 1.8 0 0 1-2.6-2.6l7.9-7.9"/></svg>
        <span class="sr-only">Attach images</span>
        <input type="file" accept="image/*" multiple class="sr-only" onChange=${(e) => setFiles([...files, ...e.target.files])} />
      </label>`}
      <textarea
        ref=${area}
        rows="1"
        aria-label=${raw ? 'JSON line for the agent' : 'Message'}
        placeholder=${raw ? '{"type":"…"}' : working ? 'Follow up (or steer)…' : 'Message the agent…'}
        value=${text}
        onInput=${(e) => setText(e.target.value)}
        onKeyDown=${onKey}
      ></textarea>
      <button class="primary send" type="submit">${raw ? 'Send line' : working ? 'Follow up' : 'Send'}</button>
    </div>
    ${working &&
    !raw &&
    html`<div class="composer-row secondary">
      <button type="button" onClick=${() => send('steer')}>Steer now</button>
      <button type="button" class="deny" onClick=${() => socket.send({ id: `a${Date.now().toString(36)}`, type: 'abort' })}>Abort</button>
    </div>`}
  </form>`;
}

function Ended({ host, s }) {
  const [stderr, setStderr] = useState(null);
  if (s.status === 'running') return null;
  const how = s.signal ? `killed by ${s.signal}` : s.exitCode !== undefined ? `exit code ${s.exitCode}` : 'ended';
  return html`<section class=${`ended ${s.status}`} aria-label="How the agent ended">
    <p><strong>${s.status === 'exited' ? 'The agent exited' : 'The agent crashed'}</strong> (${how}${s.reason ? `, ${s.reason.replace('_', ' ')}` : ''}).</p>
    ${s.error && html`<pre class="stderr">${s.error}</pre>`}
    ${stderr === null
      ? html`<button type="button" class="link" onClick=${async () => setStderr(await host.stderr(s.id))}>Show the end of its stderr</button>`
      : html`<pre class="stderr">${stderr || '(nothing on stderr)'}</pre>`}
  </section>`;
}

/** The session's worktree changes, fetched when asked for. */
function Diff({ host, s }) {
  const [diff, setDiff] = useState(null);
  const [error, setError] = useState(null);
  const [uncommitted, setUncommitted] = useState(false);
  const load = async (only) => {
    setError(null);
    setUncommitted(only);
    try {
      setDiff(await host.diff(s.id, only));
    } catch (e) {
      setError(e.message);
    }
  };
  const state = [
    s.branch && `on ${s.branch}`,
    s.ahead !== undefined && `${s.ahead} ahead`,
    s.dirty !== undefined && (s.dirty ? 'uncommitted changes' : 'clean'),
  ].filter(Boolean);
  return html`<section class="diff-view" aria-label="Changes">
    <p class="row-meta"><span>${s.project}</span>${state.map((t) => html`<span>${t}</span>`)}</p>
    <div class="session-actions">
      <button type="button" aria-pressed=${diff !== null && !uncommitted} onClick=${() => load(false)}>Diff</button>
      <button type="button" aria-pressed=${diff !== null && uncommitted} onClick=${() => load(true)}>Uncommitted</button>
      ${diff !== null && html`<button type="button" onClick=${() => setDiff(null)}>Hide</button>`}
    </div>
    ${error && html`<p class="error" role="alert">${error}</p>`}
    ${diff !== null &&
    (diff
      ? html`<pre class="diff" aria-label=${uncommitted ? 'Uncommitted changes' : `Changes against ${s.branch ? 'the base branch' : 'its base'}`}>${diff
          .split('\n')
          .map((line) => {
            const kind = line.startsWith('+++') || line.startsWith('---') ? 'file' : line[0] === '+' ? 'add' : line[0] === '-' ? 'del' : line.startsWith('@@') ? 'hunk' : '';
            return html`<span class=${kind}>${line}\n</span>`;
          })}</pre>`
      : html`<p class="muted">No changes.</p>`)}
  </section>`;
}

function SessionView({ host, store, id, instances }) {
  useStore(store);
  const s = store.sessions.get(id);
  const conv = useMemo(() => new Conversation(), [id]);
  const [, bump] = useReducer((n) => n + 1, 0);
  const [link, setLink] = useState('connecting');
  const [gap, setGap] = useState(0);
  const socket = useMemo(
    () =>
      host.session(id, {
        onHello: (h) => setGap(h.missed || 0),
        onFrame: (frame, seq, line) => {
          conv.apply(frame, seq, line);
          bump();
        },
        onEnd: () => bump(),
        onState: setLink,
      }),
    [id],
  );
  useEffect(() => () => socket.close(), [socket]);
  // A restart (seen on the event stream) brings the socket back.
  const status = s?.status;
  useEffect(() => {
    if (status === 'running') socket.reconnectNow();
  }, [status]);
  const instance = instances.find((i) => i.id === s?.instanceId);
  const rawByDefault = instance ? instance.dialect !== 'pi-rpc' || ['command', 'echo'].includes(instance.agent) : false;
  const [rawChoice, setRaw] = useState(null);
  const raw = rawChoice ?? rawByDefault;
  // Follow the bottom while the reader is there.
  const atBottom = useRef(true);
  useEffect(() => {
    const on = () => {
      atBottom.current = window.innerHeight + window.scrollY >= document.body.scrollHeight - 80;
    };
    window.addEventListener('scroll', on, { passive: true });
    return () => window.removeEventListener('scroll', on);
  }, []);
  useLayoutEffect(() => {
    if (atBottom.current) window.scrollTo(0, document.body.scrollHeight);
  });
  const remove = async () => {
    if (!confirm(`Delete session ${s ? title(s) : id}? Its agent is stopped and its output removed.`)) return;
    await host.remove(id);
    go('#/');
  };
  const [actionError, setActionError] = useState(null);
  const restart = async (conversation) => {
    setActionError(null);
    try {
      await host.restart(id, conversation);
    } catch (e) {
      setActionError(e.message);
    }
  };
  const name = s ? title(s) : id;
  useEffect(() => {
    document.title = `${s?.activity === 'waiting' ? '● ' : ''}${name} · moorline`;
  }, [name, s?.activity]);
  if (!s && store.loaded)
    return html`<main id="main"><p>No session ${id} here. <a href="#/">All sessions</a></p></main>`;
  const running = s?.status === 'running';
  return html`<main id="main" class="session">
    <div class="session-head">
      <a class="back" href="#/" aria-label="All sessions">‹</a>
      <div class="session-title">
        <h2>${s ? title(s) : id}</h2>
        ${s && html`<p class="row-meta"><span>${agentLabel(s)}</span><span title=${s.cwd}>${shortPath(s.cwd)}</span>${s.createdBy && html`<span>by ${s.createdBy}</span>`}</p>`}
      </div>
      ${s && html`<${StatusBadges} s=${s} />`}
    </div>
    <div class="session-actions">
      <span class=${`link-state ${link}`} role="status">${link === 'live' ? 'live' : link === 'ended' ? 'replayed' : `${link}…`}</span>
      <button type="button" aria-pressed=${raw} onClick=${() => setRaw(!raw)}>${raw ? 'Conversation' : 'Raw JSONL'}</button>
      ${s && !running && html`<button type="button" class="primary" onClick=${() => restart('resume')}>Restart</button>
        <button type="button" onClick=${() => restart('new')} title="Start the agent with an empty conversation">Restart fresh</button>`}
      <button type="button" class="deny" onClick=${remove}>Delete</button>
    </div>
    ${actionError && html`<p class="error" role="alert">${actionError}</p>`}
    ${s?.conversation === 'resumed' && html`<p class="notice">The agent continues its earlier conversation.</p>`}
    ${s?.project && html`<${Diff} host=${host} s=${s} />`}
    ${gap > 0 && html`<p class="notice warn">${gap} earlier output lines are no longer kept.</p>`}
    ${raw
      ? html`<ol class="raw" aria-label="Raw output" role="log">
          ${conv.raw.map((r) => html`<li key=${r.seq}><span class="seq">${r.seq}</span><code>${r.line}</code></li>`)}
        </ol>
        ${[...conv.approvals.values()]
          .filter((a) => !a.resolution)
          .map((a) => html`<${Item} key=${a.key} item=${a} socket=${socket} running=${running} />`)}`
      : html`<div class="conversation" role="log" aria-live="polite" aria-relevant="additions">
          ${conv.items.map((item) => html`<${Item} key=${item.key} item=${item} session=${s} socket=${socket} running=${running} />`)}
          ${conv.working && html`<p class="working" role="status"><span class="spinner" aria-hidden="true"></span> Working…</p>`}
        </div>`}
    ${s && html`<${Ended} host=${host} s=${s} />`}
    <${Composer}
      socket=${socket}
      working=${conv.working}
      running=${running}
      raw=${raw}
      images=${instance?.dialect === 'pi-rpc'}
    />
  </main>`;
}

// ---------------------------------------------------------------------------------------
// The app.

function App({ host }) {
  const store = useMemo(() => new SessionStore(host), [host]);
  const [me, setMe] = useState(null);
  const [instances, setInstances] = useState([]);
  const hash = useHash();
  useEffect(() => {
    host.me().then(setMe, () => {});
  }, [host]);
  const refreshInstances = useCallback(() => host.instances().then(setInstances, () => {}), [host]);
  useEffect(() => {
    refreshInstances();
  }, [hash]);
  const route = hash.replace(/^#/, '') || '/';
  // A new view: move focus to its heading, so keyboard and screen-reader users start there
  // instead of on a link that is gone.
  useEffect(() => {
    const heading = document.querySelector('main h2');
    if (heading && document.activeElement !== heading) {
      heading.tabIndex = -1;
      heading.focus({ preventScroll: true });
    }
  }, [route]);
  let view;
  const m = route.match(/^\/s\/([0-9a-f]+)$/);
  if (m) view = html`<${SessionView} key=${m[1]} host=${host} store=${store} id=${m[1]} instances=${instances} />`;
  else if (route === '/new') view = html`<${NewSession} host=${host} instances=${instances} />`;
  else view = html`<${SessionList} store=${store} host=${host} />`;
  return html`<${Header} store=${store} me=${me} host=${host} />
    ${view}`;
}

// The host this page came from. Others could be listed here later, each a base URL.
const host = new Host(new URL('.', location.href));
applyTheme(localStorage.getItem('moorline.theme') || 'auto');
const root = document.getElementById('app');
root.textContent = '';
render(html`<${App} host=${host} />`, root);

if ('serviceWorker' in navigator && window.isSecureContext) {
  navigator.serviceWorker.register('sw.js').catch(() => {});
}
