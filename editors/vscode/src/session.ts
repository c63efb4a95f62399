// The server session: starts, restarts and reconfigures the LanguageClient as settings change.
import * as vscode from 'vscode';
import { DidChangeConfigurationNotification, ExecuteCommandRequest, State, type LanguageClient } from 'vscode-languageclient/node';
import { createLanguageClient, type ClientHooks } from './client';
import { Methods, ServerCommands } from './protocol';
import { buildServerCommand, describeCommand } from './serverCommand';
import { needsRestart, readSettings, type Settings } from './settings';
import { parseStatus } from './status';
import type { StatusBar } from './statusBar';

/** Reads `codellama.*` and reports invalid values once per change. */
export function loadSettings(output: vscode.LogOutputChannel): Settings {
  const config = vscode.workspace.getConfiguration('codellama');
  const { settings, problems } = readSettings((key) => config.get(key));
  for (const problem of problems) {
    output.warn(`[settings] ${problem}`);
  }
  if (problems.length > 0) {
    void vscode.window.showWarningMessage(`Code Llama: ${problems.join(' ')}`);
  }
  return settings;
}

export class ServerSession implements vscode.Disposable {
  private client: LanguageClient | undefined;
  private acceptForwarder: vscode.Disposable | undefined;
  /** Restarts and settings changes run one after another. */
  private queue: Promise<void> = Promise.resolve();
  settings: Settings;

  constructor(
    private readonly output: vscode.LogOutputChannel,
    private readonly statusBar: StatusBar,
    private readonly hooks: Omit<ClientHooks, 'settings'>,
  ) {
    this.settings = loadSettings(output);
    statusBar.setEnabled(this.settings.enable);
  }

  async start(): Promise<void> {
    this.statusBar.setStatus({ state: 'starting', message: `Starting ${describeCommand(buildServerCommand(this.settings))}` });
    const client = createLanguageClient({ ...this.hooks, settings: () => this.settings }, this.output);
    this.client = client;
    client.onNotification(Methods.status, (params: unknown) => {
      const status = parseStatus(params);
      if (status) {
        this.statusBar.setStatus(status);
      }
    });
    client.onDidChangeState((event) => {
      if (event.newState === State.Stopped && this.client === client) {
        this.statusBar.setStatus({ state: 'stopped', message: 'The language server stopped. Run "Code Llama: Restart Server".' });
      }
    });
    try {
      await client.start();
    } catch (error) {
      this.reportStartFailure(error);
      return;
    }
    this.forwardAcceptIfNeeded(client);
  }

  /** VS Code runs the item's command on accept; make sure a command of that id exists. */
  private forwardAcceptIfNeeded(client: LanguageClient): void {
    const advertised = client.initializeResult?.capabilities.executeCommandProvider?.commands ?? [];
    if (!advertised.includes(ServerCommands.acceptCompletion)) {
      this.acceptForwarder = vscode.commands.registerCommand(ServerCommands.acceptCompletion, (...args: unknown[]) =>
        this.execute(ServerCommands.acceptCompletion, args),
      );
    }
  }

  private reportStartFailure(error: unknown): void {
    const message = `The language server did not start (${describeCommand(buildServerCommand(this.settings))}): ${String(error)}`;
    this.statusBar.setStatus({ state: 'error', message });
    this.output.error(message); // the language client has already shown a notification
  }

  async stop(): Promise<void> {
    const client = this.client;
    this.client = undefined;
    this.acceptForwarder?.dispose();
    this.acceptForwarder = undefined;
    if (client?.needsStop()) {
      await client.stop();
    }
  }

  restart(): Promise<void> {
    return this.enqueue(() => this.restartNow());
  }

  private async restartNow(): Promise<void> {
    await this.stop();
    this.statusBar.setStatus({ state: 'restarting', message: 'Restarting the language server…' });
    await this.start();
  }

  private enqueue(task: () => Promise<void>): Promise<void> {
    this.queue = this.queue.then(task, task);
    return this.queue;
  }

  /** Settings changed: restart when the process or model must change, else push them live. */
  onSettingsChanged(): Promise<void> {
    return this.enqueue(() => this.applySettings());
  }

  private async applySettings(): Promise<void> {
    const before = this.settings;
    this.settings = loadSettings(this.output);
    this.statusBar.setEnabled(this.settings.enable);
    if (needsRestart(before, this.settings)) {
      await this.restartNow();
    } else if (this.client?.isRunning()) {
      await this.client.sendNotification(DidChangeConfigurationNotification.type, { settings: this.settings.initializationOptions });
    }
  }

  async execute(command: string, args: unknown[], token?: vscode.CancellationToken): Promise<unknown> {
    const client = this.client;
    if (!client?.isRunning()) {
      throw new Error('the language server is not running');
    }
    return client.sendRequest(ExecuteCommandRequest.type, { command, arguments: args }, token);
  }

  async request(method: string, params: unknown): Promise<unknown> {
    if (!this.client?.isRunning()) {
      throw new Error('the language server is not running');
    }
    return this.client.sendRequest(method, params);
  }

  protocolUri(uri: vscode.Uri): string {
    return this.client?.code2ProtocolConverter.asUri(uri) ?? uri.toString();
  }

  dispose(): void {
    void this.stop();
  }
}
