// The conversation as the pi RPC dialect tells it (pi itself, and Claude Code and Codex as
// moorline translates them): frames in, a list of items out. Pure: no DOM, no network, so a
// replay from the journal builds exactly what the live stream built.

import { requestId } from './api.js';

/** Methods of extension_ui_request that wait for an answer (the others only inform). */
const DIALOGS = new Set(['confirm', 'select', 'input', 'editor']);

/** Longest raw history kept for the raw view (lines). */
const RAW_LIMIT = 2000;

export class Conversation {
  constructor() {
    /** @type {Array<object>} */
    this.items = [];
    this.raw = [];
    this.working = false;
    this.version = 0;
    this.current = null; // the assistant message being streamed
    this.tools = new Map(); // toolCallId -> item
    this.approvals = new Map(); // request id -> item
    this.nextKey = 1;
  }

  push(item) {
    item.key = this.nextKey++;
    this.items.push(item);
    return item;
  }

  /** Text of pi content blocks. */
  static text(content) {
    if (typeof content === 'string') return content;
    if (!Array.isArray(content)) return '';
    return content
      .filter((b) => b && b.type === 'text')
      .map((b) => b.text)
      .join('');
  }

  static images(content) {
    return Array.isArray(content) ? content.filter((b) => b && b.type === 'image') : [];
  }

  /** Applies one frame (`line` is its exact text, for the raw view). */
  apply(frame, seq, line) {
    this.version++;
    this.raw.push({ seq, line: line ?? JSON.stringify(frame), type: frame.type });
    if (this.raw.length > RAW_LIMIT) this.raw.splice(0, this.raw.length - RAW_LIMIT);
    const type = frame.type;
    switch (type) {
      case 'agent_start':
        this.working = true;
        break;
      case 'agent_end':
        this.working = false;
        this.current = null;
        this.push({ kind: 'turn_end' });
        break;
      case 'message_start':
        this.messageStart(frame.message || {});
        break;
      case 'message_update':
        this.messageUpdate(frame.assistantMessageEvent || {});
        break;
      case 'message_end':
        this.messageEnd(frame.message || {});
        break;
      case 'tool_execution_start': {
        const item = this.push({
          kind: 'tool',
          id: frame.toolCallId,
          name: frame.toolName,
          args: frame.args,
          output: '',
          done: false,
          isError: false,
        });
        this.tools.set(frame.toolCallId, item);
        break;
      }
      case 'tool_execution_update': {
        const item = this.tools.get(frame.toolCallId);
        if (item && frame.partialResult) item.output = Conversation.text(frame.partialResult.content);
        break;
      }
      case 'tool_execution_end': {
        let item = this.tools.get(frame.toolCallId);
        if (!item) {
          item = this.push({ kind: 'tool', id: frame.toolCallId, name: frame.toolName, args: frame.args });
          this.tools.set(frame.toolCallId, item);
        }
        const result = frame.result || {};
        item.output = Conversation.text(result.content) || (typeof result === 'string' ? result : '');
        item.done = true;
        item.isError = !!frame.isError;
        break;
      }
      case 'extension_ui_request':
        if (DIALOGS.has(frame.method)) this.request(frame);
        break;
      case 'control_request':
        if (frame.request?.subtype === 'can_use_tool') this.request(frame);
        break;
      case 'amarre.session_event':
        break;
      case 'amarre.approval_resolved': {
        const item = this.approvals.get(String(frame.id));
        if (item) {
          item.resolution = frame;
        } else {
          this.push({ kind: 'notice', level: 'info', text: `Approval ${frame.id}: ${frame.decision} (${frame.by})` });
        }
        break;
      }
      case 'auto_retry_start':
        this.push({
          kind: 'notice',
          level: 'warn',
          text: `Retrying (attempt ${frame.attempt ?? '?'}${frame.maxAttempts ? ` of ${frame.maxAttempts}` : ''}): ${frame.errorMessage ?? ''}`,
        });
        break;
      case 'auto_retry_end':
        if (frame.success === false)
          this.push({ kind: 'notice', level: 'error', text: `Gave up retrying: ${frame.finalError ?? ''}` });
        break;
      case 'response':
        if (frame.success === false)
          this.push({ kind: 'notice', level: 'error', text: `${frame.command ?? 'command'} failed: ${frame.error ?? ''}` });
        break;
      case 'amarre.input_rejected':
        this.push({ kind: 'notice', level: 'error', text: `Not sent to the agent (${frame.reason}): ${frame.error ?? ''}` });
        break;
      case 'amarre.auth_failed':
        this.push({ kind: 'notice', level: 'error', text: frame.message || 'The agent cannot log in to its model API.' });
        break;
      case 'amarre.line_dropped':
        this.push({ kind: 'notice', level: 'warn', text: `An output line was dropped (${frame.reason}, ${frame.bytes} bytes).` });
        break;
      default:
        // Codex's own approval requests (native dialect).
        if (typeof frame.method === 'string' && frame.method.endsWith('requestApproval')) this.request(frame);
        break;
    }
  }

  request(frame) {
    const id = requestId(frame);
    if (this.approvals.has(id)) return;
    const item = this.push({ kind: 'approval', id, request: frame, resolution: null });
    this.approvals.set(id, item);
  }

  messageStart(message) {
    if (message.role === 'user') {
      this.current = null;
      this.push({
        kind: 'user',
        text: Conversation.text(message.content),
        images: Conversation.images(message.content).length,
      });
    } else if (message.role === 'assistant') {
      this.current = this.push({ kind: 'assistant', blocks: [], streaming: true, error: null });
    }
  }

  block(index, type) {
    if (!this.current) this.current = this.push({ kind: 'assistant', blocks: [], streaming: true, error: null });
    const blocks = this.current.blocks;
    const i = Number.isInteger(index) ? index : blocks.length;
    if (!blocks[i]) blocks[i] = { type, text: '' };
    return blocks[i];
  }

  messageUpdate(event) {
    switch (event.type) {
      case 'text_start':
        this.block(event.contentIndex, 'text');
        break;
      case 'text_delta':
        this.block(event.contentIndex, 'text').text += event.delta ?? '';
        break;
      case 'thinking_start':
        this.block(event.contentIndex, 'thinking');
        break;
      case 'thinking_delta':
        this.block(event.contentIndex, 'thinking').text += event.delta ?? '';
        break;
      default:
        break;
    }
  }

  messageEnd(message) {
    if (message.role !== 'assistant') return;
    let item = this.current;
    if (!item) item = this.push({ kind: 'assistant', blocks: [], streaming: false, error: null });
    // The final message is the truth: it replaces what the deltas built.
    if (Array.isArray(message.content)) {
      const blocks = [];
      for (const b of message.content) {
        if (b.type === 'text') blocks.push({ type: 'text', text: b.text ?? '' });
        else if (b.type === 'thinking') blocks.push({ type: 'thinking', text: b.thinking ?? b.text ?? '' });
      }
      if (blocks.length || !item.blocks.length) item.blocks = blocks;
    }
    item.streaming = false;
    if (message.stopReason === 'error' || message.errorMessage) {
      item.error = message.errorMessage || 'The model reported an error.';
    } else if (message.stopReason === 'aborted') {
      item.error = 'Aborted.';
    }
    this.current = null;
  }
}
