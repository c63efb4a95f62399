// Builds the command line that starts the language server. No `vscode` import.
import type { Settings } from './settings';

export interface ServerCommandLine {
  command: string;
  args: string[];
}

/** Command-line flags of `codellama-lsp serve`, by the setting that fills them. */
const FLAGS: readonly (readonly [string, string])[] = [
  ['model.ckptDir', '--ckpt-dir'],
  ['model.tokenizerPath', '--tokenizer-path'],
  ['model.nproc', '--nproc'],
  ['model.device', '--device'],
  ['model.dtype', '--dtype'],
  ['model.maxSeqLen', '--max-seq-len'],
  ['model.maxBatchSize', '--max-batch-size'],
  ['actions.instructCkptDir', '--instruct-ckpt-dir'],
];

/**
 * `PYTHON -m codellama_lsp serve FLAGS` when a Python path is set, else `COMMAND ARGS serve FLAGS`.
 * The same values also travel as initializationOptions; the flags let the server start loading
 * the model before `initialize` arrives.
 */
export function buildServerCommand(settings: Settings): ServerCommandLine {
  const { command, pythonPath, args } = settings.server;
  const head = pythonPath !== '' ? [pythonPath, ...args, '-m', 'codellama_lsp'] : [command, ...args];
  const flags = FLAGS.flatMap(([key, flag]) => {
    const value = settings.values.get(key);
    return value === undefined ? [] : [flag, String(value)];
  });
  return { command: head[0] ?? command, args: [...head.slice(1), 'serve', ...flags] };
}

/** The command line as one shell-like string, for logs and error messages. */
export function describeCommand(line: ServerCommandLine): string {
  return [line.command, ...line.args].map((part) => (/^[\w@%+=:,./-]+$/.test(part) ? part : JSON.stringify(part))).join(' ');
}
