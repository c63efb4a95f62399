import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { commandRange, completionIdOf } from '../src/completion';

describe('completionIdOf', () => {
  it('reads the id from the accept command arguments', () => {
    assert.equal(completionIdOf({ command: 'codellama.acceptCompletion', arguments: ['c-1'] }), 'c-1');
    assert.equal(completionIdOf({ command: 'codellama.acceptCompletion', arguments: [{ uri: 'file:///a', completionId: 'c-2' }] }), 'c-2');
    assert.equal(completionIdOf({ command: 'codellama.acceptCompletion', arguments: [7] }), '7');
  });
  it('is undefined without a usable argument', () => {
    assert.equal(completionIdOf(undefined), undefined);
    assert.equal(completionIdOf({ command: 'x' }), undefined);
    assert.equal(completionIdOf({ command: 'x', arguments: [{ id: 1 }] }), undefined);
  });
});

describe('commandRange', () => {
  it('keeps a non-empty selection', () => {
    const sel = { start: { line: 1, character: 0 }, end: { line: 2, character: 3 } };
    assert.deepEqual(commandRange(sel, [4, 5, 6]), sel);
  });
  it('takes the whole document for an empty selection', () => {
    const caret = { start: { line: 1, character: 2 }, end: { line: 1, character: 2 } };
    assert.deepEqual(commandRange(caret, [4, 5, 6]), { start: { line: 0, character: 0 }, end: { line: 2, character: 6 } });
    assert.deepEqual(commandRange(caret, []), { start: { line: 0, character: 0 }, end: { line: 0, character: 0 } });
  });
});
