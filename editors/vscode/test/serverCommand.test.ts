import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { buildServerCommand, describeCommand } from '../src/serverCommand';
import { readSettings } from '../src/settings';

const settings = (values: Record<string, unknown>) => readSettings((key) => values[key]).settings;

describe('buildServerCommand', () => {
  it('runs `codellama-lsp serve` by default', () => {
    assert.deepEqual(buildServerCommand(settings({})), { command: 'codellama-lsp', args: ['serve'] });
  });

  it('adds the model flags of the wire contract when set', () => {
    const line = buildServerCommand(settings({ 'model.ckptDir': '/m/7b', 'actions.instructCkptDir': '/m/7b-i', 'model.nproc': 2, 'model.device': 'cuda', 'model.dtype': 'bfloat16' }));
    assert.deepEqual(line, {
      command: 'codellama-lsp',
      args: ['serve', '--ckpt-dir', '/m/7b', '--nproc', '2', '--device', 'cuda', '--dtype', 'bfloat16', '--instruct-ckpt-dir', '/m/7b-i'],
    });
  });

  it('uses `PYTHON -m codellama_lsp serve` when a Python path is set', () => {
    const line = buildServerCommand(settings({ 'server.pythonPath': '/venv/bin/python', 'server.command': 'ignored', 'model.ckptDir': '/m' }));
    assert.deepEqual(line, { command: '/venv/bin/python', args: ['-m', 'codellama_lsp', 'serve', '--ckpt-dir', '/m'] });
  });

  it('puts extra arguments between the command and `serve`', () => {
    const line = buildServerCommand(settings({ 'server.command': 'uv', 'server.args': ['run', 'codellama-lsp'] }));
    assert.deepEqual(line, { command: 'uv', args: ['run', 'codellama-lsp', 'serve'] });
  });
});

describe('describeCommand', () => {
  it('quotes only the parts that need it', () => {
    assert.equal(describeCommand({ command: '/usr/bin/python', args: ['-m', 'codellama_lsp', 'serve', '--ckpt-dir', '/my models/7b'] }), '/usr/bin/python -m codellama_lsp serve --ckpt-dir "/my models/7b"');
  });
});
