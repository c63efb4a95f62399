// Entry point: wires the status bar, the server session, the Explain view and the commands.
import * as vscode from 'vscode';
import { askInstruction, registerCommands, showCodeActionExplanation } from './commands';
import { EXPLAIN_SCHEME, ExplainView } from './explainView';
import { ServerSession } from './session';
import { StatusBar } from './statusBar';

let session: ServerSession | undefined;

export async function activate(context: vscode.ExtensionContext): Promise<void> {
  const output = vscode.window.createOutputChannel('Code Llama', { log: true });
  const statusBar = new StatusBar();
  const explainView = new ExplainView();
  session = new ServerSession(output, statusBar, {
    showExplanation: (args, result) => showCodeActionExplanation(explainView, args, result),
    askInstruction: () => Promise.resolve(askInstruction()),
  });
  const current = session;
  context.subscriptions.push(
    output,
    statusBar,
    explainView,
    current,
    vscode.workspace.registerTextDocumentContentProvider(EXPLAIN_SCHEME, explainView),
    vscode.workspace.onDidChangeConfiguration((event) => {
      if (event.affectsConfiguration('codellama')) {
        void current.onSettingsChanged();
      }
    }),
    ...registerCommands(current, explainView, output),
  );
  await current.start();
}

export async function deactivate(): Promise<void> {
  await session?.stop();
  session = undefined;
}
