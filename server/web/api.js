// The wire: one moorline host, named by its base URL. REST, the session event stream
// (GET /events) and per-session WebSockets with replay. Nothing here touches the page, so
// several hosts can later be shown side by side.

/** A moorline server reachable at `base` (an absolute URL ending in `/`). */
export class Host {
  constructor(base) {
    this.base = new URL(base);
  }

  url(path) {
    return new URL(path.replace(/^\//, ''), this.base);
  }

  async request(method, path, body) {
    const init = { method, headers: {} };
    if (body !== undefined) {
      init.body = JSON.stringify(body);
      init.headers['content-type'] = 'application/json';
    }
    const resp = await fetch(this.url(path), init);
    const text = await resp.text();
    let data = null;
    try {
      data = text ? JSON.parse(text) : null;
    } catch {
      data = text;
    }
    if (!resp.ok) {
      const message =
        (data && (data.message || data.error)) || text.trim() || resp.statusText;
      const error = new Error(message);
      error.status = resp.status;
      error.body = data;
      throw error;
    }
    return data;
  }

  me() {
    return this.request('GET', '/me');
  }
  instances() {
    return this.request('GET', '/instances');
  }
  create(body) {
    return this.request('POST', '/sessions', body);
  }
  remove(id) {
    return this.request('DELETE', `/sessions/${id}`);
  }
  /** `conversation`: 'resume' (the default: continue the agent's conversation) or 'new'. */
  restart(id, conversation = 'resume') {
    return this.request('POST', `/sessions/${id}/restart`, { conversation });
  }
  projects() {
    return this.request('GET', '/projects');
  }
  /** The session's worktree against its base branch (`uncommitted`: only what is not committed). */
  async diff(id, uncommitted = false) {
    const resp = await fetch(this.url(`/sessions/${id}/diff${uncommitted ? '?uncommitted=1' : ''}`));
    const text = await resp.text();
    if (!resp.ok) {
      let message = text;
      try {
        const body = JSON.parse(text);
        message = body.message || body.error;
      } catch {}
      throw new Error(message || resp.statusText);
    }
    return text;
  }
  async stderr(id) {
    const resp = await fetch(this.url(`/sessions/${id}/stderr`));
    return resp.ok ? resp.text() : '';
  }

  /**
   * Follows GET /events. `onEvent` gets the snapshot and every event; EventSource reconnects
   * by itself with Last-Event-ID, and the server replays what was missed (or sends a fresh
   * snapshot). `onState` hears 'live' / 'reconnecting'.
   */
  events(onEvent, onState) {
    const source = new EventSource(this.url('/events'));
    source.onopen = () => onState('live');
    source.onerror = () => onState(source.readyState === 2 ? 'closed' : 'reconnecting');
    source.onmessage = (m) => {
      try {
        onEvent(JSON.parse(m.data));
      } catch (e) {
        console.warn('bad event', e);
      }
    };
    return () => source.close();
  }

  /** A session's WebSocket that replays and reconnects: see `SessionSocket`. */
  session(id, handlers) {
    return new SessionSocket(this, id, handlers);
  }
}

/**
 * One session's WebSocket. Asks for `?since=<last line seen>` on every (re)connection, so
 * each output line reaches `onFrame` exactly once, however often the network drops, the
 * phone sleeps or the server restarts. Lines are numbered by the counting rule of
 * docs/PROTOCOL.md: after `amarre.hello`, every frame but the final `amarre.session_event`
 * is the next line.
 */
export class SessionSocket {
  constructor(host, id, { onFrame, onHello, onState, onEnd }) {
    this.host = host;
    this.id = id;
    this.handlers = { onFrame, onHello, onState, onEnd };
    this.lastSeq = 0;
    this.next = null;
    this.ws = null;
    this.closed = false;
    this.retry = 500;
    this.timer = null;
    this.ended = false;
    this.wake = () => {
      if (document.visibilityState === 'visible') this.reconnectNow();
    };
    window.addEventListener('online', this.wake);
    document.addEventListener('visibilitychange', this.wake);
    this.connect();
  }

  connect() {
    if (this.closed) return;
    clearTimeout(this.timer);
    const url = this.host.url(`/sessions/${this.id}`);
    url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
    url.search = `?since=${this.lastSeq}`;
    const ws = new WebSocket(url);
    this.ws = ws;
    this.next = null;
    this.handlers.onState('connecting');
    ws.onmessage = (m) => {
      if (ws !== this.ws) return;
      let frame;
      try {
        frame = JSON.parse(m.data);
      } catch {
        frame = { type: 'amarre.raw', text: String(m.data) };
      }
      if (this.next === null && frame.type === 'amarre.hello') {
        this.next = frame.replayFrom;
        this.ended = frame.status !== 'running';
        this.retry = 500;
        this.handlers.onState('live');
        this.handlers.onHello(frame);
        return;
      }
      if (frame.type === 'amarre.session_event') {
        this.ended = true;
        this.handlers.onEnd(frame);
        return;
      }
      const seq = this.next ?? this.lastSeq + 1;
      this.next = seq + 1;
      this.lastSeq = seq;
      this.handlers.onFrame(frame, seq, m.data);
    };
    ws.onclose = (e) => {
      if (ws !== this.ws || this.closed) return;
      this.ws = null;
      // An ended session's replay is complete; a restart reconnects (see `resume`).
      if (this.ended || e.code === 1000) {
        this.handlers.onState('ended');
        return;
      }
      this.handlers.onState('reconnecting');
      this.timer = setTimeout(() => this.connect(), this.retry);
      this.retry = Math.min(this.retry * 2, 10000);
    };
  }

  /** Connects again now (the session was restarted, or the network is back). */
  reconnectNow() {
    if (this.closed) return;
    if (this.ws && this.ws.readyState <= 1) return;
    this.ended = false;
    this.retry = 500;
    this.connect();
  }

  get open() {
    return this.ws !== null && this.ws.readyState === 1;
  }

  /** Sends one line to the agent; false when not connected. */
  send(value) {
    if (!this.open) return false;
    this.ws.send(typeof value === 'string' ? value : JSON.stringify(value));
    return true;
  }

  close() {
    this.closed = true;
    clearTimeout(this.timer);
    window.removeEventListener('online', this.wake);
    document.removeEventListener('visibilitychange', this.wake);
    if (this.ws) this.ws.close(1000);
  }
}

/**
 * The answer to an approval request in the dialect it was asked in (pi RPC's
 * extension_ui_request, Claude's can_use_tool, Codex's requestApproval); null when the
 * request is not a yes/no question.
 */
export function answerFor(request, allow) {
  if (request.type === 'extension_ui_request') {
    return { type: 'extension_ui_response', id: request.id, confirmed: allow };
  }
  if (request.type === 'control_request' && request.request?.subtype === 'can_use_tool') {
    const response = allow
      ? { behavior: 'allow', updatedInput: request.request.input ?? {} }
      : { behavior: 'deny', message: 'denied from the moorline web app' };
    return {
      type: 'control_response',
      response: { subtype: 'success', request_id: request.request_id, response },
    };
  }
  if (typeof request.method === 'string' && request.method.endsWith('requestApproval')) {
    return { id: request.id, result: { decision: allow ? 'accept' : 'decline' } };
  }
  return null;
}

/** The id clients answer a request by, in any dialect. */
export function requestId(request) {
  return String(request.request_id ?? request.id ?? '');
}

/** The tool a request is about, and what it wants to do, for a card. */
export function describeRequest(request) {
  if (request.type === 'extension_ui_request') {
    let detail = request.message || '';
    // pi's gate puts the tool's input in the message as JSON: show the command itself.
    try {
      const input = JSON.parse(detail);
      if (input && typeof input === 'object') detail = input.command ?? input.path ?? JSON.stringify(input, null, 2);
    } catch {
      // plain text
    }
    return { tool: request.title || 'Approval', detail: String(detail) };
  }
  if (request.type === 'control_request') {
    const input = request.request?.input ?? {};
    return {
      tool: request.request?.tool_name || 'tool',
      detail: input.command ?? JSON.stringify(input, null, 2),
    };
  }
  const params = request.params ?? {};
  return {
    tool: request.method?.includes('fileChange') ? 'file change' : 'command',
    detail: params.command ?? JSON.stringify(params, null, 2),
  };
}
