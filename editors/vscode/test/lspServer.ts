// Starts the real language server as `buildServerCommand` does and talks to it over stdio with
// vscode-jsonrpc, as VS Code's language client would. Used by the round-trip tests and the e2e.
import { spawn, type ChildProcess } from 'node:child_process';
import { createMessageConnection, StreamMessageReader, StreamMessageWriter, type MessageConnection } from 'vscode-jsonrpc/node';
import { buildServerCommand } from '../src/serverCommand';
import type { Settings } from '../src/settings';
import { parseStatus, type Status } from '../src/status';

export interface ServerProcess {
  connection: MessageConnection;
  child: ChildProcess;
  statuses: Status[];
  stderr: () => string;
  /** Resolves with the first `codellama/status` of this state (or rejects after `timeoutMs`). */
  waitForState(state: Status['state'], timeoutMs: number): Promise<Status>;
  close(): Promise<void>;
}

export function startServer(settings: Settings): ServerProcess {
  const line = buildServerCommand(settings);
  const child = spawn(line.command, line.args, { stdio: ['pipe', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr?.on('data', (chunk: Buffer) => (stderr += chunk.toString()));
  if (!child.stdout || !child.stdin) {
    throw new Error('the server has no stdio pipes');
  }
  const connection = createMessageConnection(new StreamMessageReader(child.stdout), new StreamMessageWriter(child.stdin));
  const statuses: Status[] = [];
  const waiters: (() => void)[] = [];
  connection.onNotification('codellama/status', (params: unknown) => {
    const status = parseStatus(params);
    if (status) {
      statuses.push(status);
      waiters.splice(0).forEach((wake) => wake());
    }
  });
  connection.onRequest('workspace/applyEdit', () => ({ applied: true }));
  connection.onRequest('workspace/configuration', (params: { items: unknown[] }) => params.items.map(() => settings.initializationOptions));
  connection.onRequest('window/workDoneProgress/create', () => null);
  connection.onRequest('client/registerCapability', () => null);
  connection.onRequest('window/showDocument', () => ({ success: true }));
  connection.onNotification('window/showMessage', () => undefined);
  connection.onNotification('window/logMessage', () => undefined);
  connection.listen();

  const waitForState = (state: Status['state'], timeoutMs: number): Promise<Status> =>
    new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`no "${state}" status within ${timeoutMs} ms; got ${JSON.stringify(statuses)}\n${stderr}`)), timeoutMs);
      const check = (): void => {
        const found = statuses.find((s) => s.state === state);
        if (found) {
          clearTimeout(timer);
          resolve(found);
        } else {
          waiters.push(check);
        }
      };
      check();
    });

  const close = async (): Promise<void> => {
    try {
      await withTimeout(connection.sendRequest('shutdown'), 10_000);
      await connection.sendNotification('exit');
    } catch {
      child.kill('SIGTERM');
    }
    await new Promise<void>((resolve) => {
      const timer = setTimeout(() => {
        child.kill('SIGKILL');
        resolve();
      }, 10_000);
      if (child.exitCode !== null) {
        clearTimeout(timer);
        resolve();
      }
      child.once('exit', () => {
        clearTimeout(timer);
        resolve();
      });
    });
    connection.dispose();
  };
  return { connection, child, statuses, stderr: () => stderr, waitForState, close };
}

export function withTimeout<T>(promise: Promise<T>, ms: number): Promise<T> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms`)), ms);
    promise.then(
      (value) => {
        clearTimeout(timer);
        resolve(value);
      },
      (error: unknown) => {
        clearTimeout(timer);
        reject(error instanceof Error ? error : new Error(String(error)));
      },
    );
  });
}

/** Client capabilities close to what VS Code's language client announces. */
export const CLIENT_CAPABILITIES = {
  workspace: { applyEdit: true, configuration: true, didChangeConfiguration: { dynamicRegistration: false }, executeCommand: {} },
  textDocument: {
    synchronization: { didSave: true },
    inlineCompletion: { dynamicRegistration: false },
    completion: { completionItem: { snippetSupport: false } },
    codeAction: { codeActionLiteralSupport: { codeActionKind: { valueSet: ['', 'quickfix', 'refactor', 'refactor.rewrite', 'source'] } }, resolveSupport: { properties: ['edit'] } },
  },
  window: { workDoneProgress: true, showDocument: { support: true } },
  experimental: { codellama: { explainResult: true } },
};
