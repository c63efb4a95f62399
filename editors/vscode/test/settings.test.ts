import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { checkValue, completionsEnabledFor, needsRestart, readSettings, SETTINGS } from '../src/settings';

const read = (values: Record<string, unknown>) => readSettings((key) => values[key]);

describe('readSettings', () => {
  it('forwards nothing but what the user set, so the server defaults apply', () => {
    const { settings, problems } = read({ enable: true, 'server.command': 'codellama-lsp', 'model.ckptDir': '', 'model.nproc': null });
    assert.deepEqual(problems, []);
    assert.deepEqual(settings.initializationOptions, {});
    assert.equal(settings.enable, true);
    assert.deepEqual(settings.server, { command: 'codellama-lsp', pythonPath: '', args: [] });
  });

  it('maps codellama.SECTION.NAME onto {SECTION: {NAME}} of the wire contract', () => {
    const { settings } = read({
      'model.ckptDir': '/m/CodeLlama-7b',
      'model.nproc': 2,
      'model.device': 'cuda',
      'completion.fimFormat': 'spm',
      'completion.maxTokensSingleLine': 32,
      'completion.temperature': 0,
      'completion.debounceMs': 0,
      'completion.languages': ['python'],
      'actions.instructCkptDir': '/m/CodeLlama-7b-Instruct',
      'actions.safetyCommand': 'guard --check',
      'server.logLevel': 'debug',
    });
    assert.deepEqual(settings.initializationOptions, {
      model: { ckptDir: '/m/CodeLlama-7b', nproc: 2, device: 'cuda' },
      completion: { fimFormat: 'spm', maxTokensSingleLine: 32, temperature: 0, debounceMs: 0, languages: ['python'] },
      actions: { instructCkptDir: '/m/CodeLlama-7b-Instruct', safetyCommand: 'guard --check' },
      server: { logLevel: 'debug' },
    });
  });

  it('keeps client-only settings out of the wire object', () => {
    const { settings } = read({ enable: false, 'server.command': '/opt/bin/codellama-lsp', 'server.pythonPath': '/usr/bin/python3', 'server.args': ['-X', 'dev'] });
    assert.deepEqual(settings.initializationOptions, {});
    assert.equal(settings.enable, false);
    assert.deepEqual(settings.server, { command: '/opt/bin/codellama-lsp', pythonPath: '/usr/bin/python3', args: ['-X', 'dev'] });
  });

  it('drops invalid values with one readable problem each', () => {
    const { settings, problems } = read({ 'model.nproc': 0, 'completion.temperature': 3, 'model.device': 'tpu', 'completion.languages': 'python', 'completion.maxTokensMultiline': 2.5 });
    assert.deepEqual(settings.initializationOptions, {});
    assert.equal(problems.length, 5);
    assert.match(problems[0] ?? '', /^codellama\.model\.nproc: expected an integer ≥ 1 and ≤ 64, got 0; using the default\.$/);
    assert.ok(problems.some((p) => p.includes('codellama.model.device') && p.includes('auto, cpu, cuda')));
    assert.ok(problems.some((p) => p.includes('codellama.completion.languages') && p.includes('list of strings')));
  });

  it('trims strings and treats blank ones as unset', () => {
    const { settings } = read({ 'model.ckptDir': '  /m/x  ', 'actions.instructCkptDir': '   ' });
    assert.deepEqual(settings.initializationOptions, { model: { ckptDir: '/m/x' } });
  });
});

describe('checkValue', () => {
  it('honours exclusive minimums', () => {
    const topP = SETTINGS.find((s) => s.key === 'completion.topP');
    assert.ok(topP);
    assert.ok('problem' in checkValue(topP.kind, 0));
    assert.deepEqual(checkValue(topP.kind, 1), { value: 1 });
  });
  it('rejects NaN and strings for numbers', () => {
    const kind = { type: 'number', min: 0, max: 2 } as const;
    assert.ok('problem' in checkValue(kind, Number.NaN));
    assert.ok('problem' in checkValue(kind, '0.5'));
  });
});

describe('needsRestart', () => {
  const base = read({ 'model.ckptDir': '/a', 'completion.temperature': 0.2 }).settings;
  it('is true when a model path or the server command changes', () => {
    assert.equal(needsRestart(base, read({ 'model.ckptDir': '/b', 'completion.temperature': 0.2 }).settings), true);
    assert.equal(needsRestart(base, read({ 'model.ckptDir': '/a', 'actions.instructCkptDir': '/i', 'completion.temperature': 0.2 }).settings), true);
    assert.equal(needsRestart(base, read({ 'model.ckptDir': '/a', 'server.pythonPath': '/py', 'completion.temperature': 0.2 }).settings), true);
  });
  it('is true when a server setting is cleared, so its default comes back', () => {
    assert.equal(needsRestart(base, read({ 'model.ckptDir': '/a' }).settings), true);
  });
  it('is false for settings the server takes live', () => {
    assert.equal(needsRestart(base, read({ 'model.ckptDir': '/a', 'completion.temperature': 0.7, 'server.logLevel': 'debug', enable: false }).settings), false);
  });
});

describe('completionsEnabledFor', () => {
  it('follows the toggle and the language list', () => {
    assert.equal(completionsEnabledFor(read({}).settings, 'rust'), true);
    assert.equal(completionsEnabledFor(read({ enable: false }).settings, 'rust'), false);
    assert.equal(completionsEnabledFor(read({ 'completion.languages': ['python'] }).settings, 'rust'), false);
    assert.equal(completionsEnabledFor(read({ 'completion.languages': ['python'] }).settings, 'python'), true);
    assert.equal(completionsEnabledFor(read({ 'completion.languages': ['*'] }).settings, 'rust'), true);
  });
});
