// A stdio round trip with the REAL Python server and a tiny random-weight checkpoint.
// tests/test_vscode.py writes the checkpoint and sets CODELLAMA_TEST_PYTHON / CODELLAMA_TEST_CKPT.
import assert from 'node:assert/strict';
import { after, before, describe, it } from 'node:test';
import { pathToFileURL } from 'node:url';
import { completionIdOf } from '../src/completion';
import { markdownOf } from '../src/markdown';
import { readSettings } from '../src/settings';
import { CLIENT_CAPABILITIES, startServer, withTimeout, type ServerProcess } from './lspServer';

const python = process.env.CODELLAMA_TEST_PYTHON ?? '';
const ckpt = process.env.CODELLAMA_TEST_CKPT ?? '';
const skip = python === '' || ckpt === '' ? 'set CODELLAMA_TEST_PYTHON and CODELLAMA_TEST_CKPT (tests/test_vscode.py does)' : false;

/** The settings a user of a tiny CPU model would put in settings.json. */
export const TINY_SETTINGS: Record<string, unknown> = {
  'server.pythonPath': python,
  'model.ckptDir': ckpt,
  'model.device': 'cpu',
  'model.dtype': 'float32',
  'model.maxSeqLen': 512,
  'model.maxBatchSize': 2,
  'completion.temperature': 0,
  'completion.maxTokensSingleLine': 12,
  'completion.maxTokensMultiline': 24,
  'completion.numCandidates': 1,
  'completion.debounceMs': 0,
  'actions.instructCkptDir': ckpt,
  'actions.temperature': 0,
  'actions.maxGenLen': 24,
};

const uri = pathToFileURL('/tmp/codellama-roundtrip/example.py').href;
const TEXT = 'def add(a, b):\n    return a + b\n\n\ndef mul(a, b):\n    ';

interface InlineItem {
  insertText: string | { value: string };
  command?: { command: string; arguments?: unknown[] };
}

describe('stdio round trip with the real server', { skip, timeout: 240_000 }, () => {
  let server: ServerProcess;
  let capabilities: Record<string, unknown>;

  before(async () => {
    const { settings, problems } = readSettings((key) => TINY_SETTINGS[key]);
    assert.deepEqual(problems, []);
    server = startServer(settings);
    const result = await withTimeout(
      server.connection.sendRequest<{ capabilities: Record<string, unknown> }>('initialize', {
        processId: process.pid,
        rootUri: null,
        capabilities: CLIENT_CAPABILITIES,
        initializationOptions: settings.initializationOptions,
        clientInfo: { name: 'codellama-vscode-roundtrip' },
      }),
      120_000,
    );
    capabilities = result.capabilities;
    await server.connection.sendNotification('initialized', {});
    await server.waitForState('ready', 180_000);
    await server.connection.sendNotification('textDocument/didOpen', { textDocument: { uri, languageId: 'python', version: 1, text: TEXT } });
  });

  after(async () => {
    await server.close();
  });

  it('advertises inline completion and the commands of the wire contract', () => {
    assert.ok(capabilities.inlineCompletionProvider, JSON.stringify(capabilities));
    const commands = (capabilities.executeCommandProvider as { commands: string[] } | undefined)?.commands ?? [];
    for (const command of ['codellama.explain', 'codellama.refactor', 'codellama.addDocstring', 'codellama.writeTests', 'codellama.acceptCompletion']) {
      assert.ok(commands.includes(command), `${command} in ${JSON.stringify(commands)}`);
    }
  });

  it('answers textDocument/inlineCompletion with a completion, and takes the shown/accepted reports', async () => {
    const lines = TEXT.split('\n');
    const position = { line: lines.length - 1, character: (lines.at(-1) ?? '').length };
    const result = await withTimeout(
      server.connection.sendRequest<InlineItem[] | { items: InlineItem[] } | null>('textDocument/inlineCompletion', {
        textDocument: { uri },
        position,
        context: { triggerKind: 1 },
      }),
      120_000,
    );
    const items = Array.isArray(result) ? result : (result?.items ?? []);
    assert.ok(items.length > 0, `no completion: ${JSON.stringify(result)}\n${server.stderr()}`);
    const first = items[0];
    assert.ok(first);
    const text = typeof first.insertText === 'string' ? first.insertText : first.insertText.value;
    assert.ok(text.length > 0, 'empty insertText');
    assert.equal(first.command?.command, 'codellama.acceptCompletion');
    const completionId = completionIdOf(first.command);
    assert.ok(completionId !== undefined, `no completion id in ${JSON.stringify(first.command)}`);
    await server.connection.sendNotification('codellama/didShowCompletion', { uri, completionId });
    await withTimeout(server.connection.sendRequest('workspace/executeCommand', { command: 'codellama.acceptCompletion', arguments: first.command?.arguments ?? [] }), 30_000);
    const stats = await withTimeout(server.connection.sendRequest<Record<string, unknown>>('codellama/stats', {}), 30_000);
    assert.ok(JSON.stringify(stats).length > 2, JSON.stringify(stats));
  });

  it('explains code with Markdown (codellama.explain)', async () => {
    const range = { start: { line: 0, character: 0 }, end: { line: 1, character: 16 } };
    const result = await withTimeout(server.connection.sendRequest('workspace/executeCommand', { command: 'codellama.explain', arguments: [uri, range] }), 120_000);
    const markdown = markdownOf(result);
    assert.ok(markdown !== undefined && markdown.trim().length > 0, `no Markdown: ${JSON.stringify(result)}`);
  });
});
