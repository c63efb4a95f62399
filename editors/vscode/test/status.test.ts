import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { formatStatus, parseStatus, percent } from '../src/status';

describe('parseStatus', () => {
  it('accepts the four server states with optional progress', () => {
    assert.deepEqual(parseStatus({ state: 'loading', message: 'consolidated.00.pth', progress: { done: 5, total: 10 } }), {
      state: 'loading',
      message: 'consolidated.00.pth',
      progress: { done: 5, total: 10 },
    });
    assert.deepEqual(parseStatus({ state: 'ready' }), { state: 'ready', message: '' });
  });
  it('rejects malformed payloads and drops bad progress', () => {
    assert.equal(parseStatus(null), undefined);
    assert.equal(parseStatus({ state: 'sleeping' }), undefined);
    assert.equal(parseStatus('ready'), undefined);
    assert.deepEqual(parseStatus({ state: 'loading', message: 'x', progress: { done: 1, total: 0 } }), { state: 'loading', message: 'x' });
  });
});

describe('formatStatus', () => {
  it('shows loading progress as a percentage', () => {
    const view = formatStatus({ state: 'loading', message: 'Loading shard 1/2', progress: { done: 1, total: 3 } }, true);
    assert.equal(view.text, '$(loading~spin) Code Llama: loading 33%');
    assert.match(view.tooltip, /Loading shard 1\/2/);
  });
  it('distinguishes ready with completions on and off', () => {
    assert.equal(formatStatus({ state: 'ready', message: '' }, true).text, '$(check) Code Llama');
    assert.equal(formatStatus({ state: 'ready', message: '' }, false).text, '$(circle-slash) Code Llama: off');
    assert.match(formatStatus({ state: 'ready', message: '' }, false).tooltip, /turn inline completions on/);
  });
  it('marks restarting as a warning and errors as errors', () => {
    assert.equal(formatStatus({ state: 'restarting', message: '' }, true).severity, 'warning');
    const error = formatStatus({ state: 'error', message: 'CheckpointError: params.json missing' }, true);
    assert.equal(error.severity, 'error');
    assert.equal(error.text, '$(error) Code Llama');
    assert.match(error.tooltip, /params\.json missing/);
  });
  it('clamps percentages', () => {
    assert.equal(percent({ done: 12, total: 10 }), 100);
    assert.equal(percent({ done: -1, total: 10 }), 0);
  });
});
