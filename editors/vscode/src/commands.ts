// The palette and context menu commands of the extension.
import * as vscode from 'vscode';
import { commandRange, type LineRange } from './completion';
import { explainSource, type ExplainView } from './explainView';
import { formatStats, markdownOf } from './markdown';
import { ExtensionCommands, Methods, ServerCommands } from './protocol';
import type { ServerSession } from './session';

const ACTION_TITLES: Record<string, string> = {
  [ServerCommands.explain]: 'Explaining',
  [ServerCommands.refactor]: 'Refactoring',
  [ServerCommands.addDocstring]: 'Writing a docstring',
  [ServerCommands.writeTests]: 'Writing unit tests',
};

export function askInstruction(): Thenable<string | undefined> {
  return vscode.window.showInputBox({
    title: 'Code Llama: Refactor',
    prompt: 'How should the selected code change?',
    placeHolder: 'for example: use a list comprehension',
    ignoreFocusOut: true,
    validateInput: (text) => (text.trim() === '' ? 'Describe the change.' : undefined),
  });
}

export function registerCommands(session: ServerSession, explainView: ExplainView, output: vscode.LogOutputChannel): vscode.Disposable[] {
  const run = (command: string, extra: () => Thenable<string | undefined> = () => Promise.resolve('')) => async () => {
    const editor = vscode.window.activeTextEditor;
    if (!editor) {
      return void vscode.window.showInformationMessage('Code Llama: open a file first.');
    }
    const instruction = await extra();
    if (instruction === undefined) {
      return;
    }
    const range = editorRange(editor);
    const args = [session.protocolUri(editor.document.uri), range, ...(instruction === '' ? [] : [instruction])];
    const result = await withProgress(ACTION_TITLES[command] ?? command, (token) => session.execute(command, args, token));
    if (command === ServerCommands.explain && result !== undefined) {
      await showExplanation(explainView, editor.document, range, result);
    }
  };
  return [
    vscode.commands.registerCommand(ExtensionCommands.explain, run(ServerCommands.explain)),
    vscode.commands.registerCommand(ExtensionCommands.refactor, run(ServerCommands.refactor, askInstruction)),
    vscode.commands.registerCommand(ExtensionCommands.addDocstring, run(ServerCommands.addDocstring)),
    vscode.commands.registerCommand(ExtensionCommands.writeTests, run(ServerCommands.writeTests)),
    vscode.commands.registerCommand(ExtensionCommands.toggle, toggle),
    vscode.commands.registerCommand(ExtensionCommands.restartServer, () => session.restart()),
    vscode.commands.registerCommand(ExtensionCommands.showOutput, () => output.show()),
    vscode.commands.registerCommand(ExtensionCommands.showStats, async () => {
      const stats = await session.request(Methods.stats, {});
      void vscode.window.showInformationMessage(`Code Llama: ${formatStats(stats)}`);
    }),
  ];
}

/** Flips `codellama.enable` where it is set: the workspace when it overrides the user value. */
async function toggle(): Promise<void> {
  const config = vscode.workspace.getConfiguration('codellama');
  const enable = !config.get<boolean>('enable', true);
  const inspected = config.inspect<boolean>('enable');
  const target = inspected?.workspaceValue !== undefined ? vscode.ConfigurationTarget.Workspace : vscode.ConfigurationTarget.Global;
  await config.update('enable', enable, target);
  if (!enable) {
    await vscode.commands.executeCommand('editor.action.inlineSuggest.hide');
  }
}

function editorRange(editor: vscode.TextEditor): LineRange {
  const { start, end } = editor.selection;
  const doc = editor.document;
  const lengths = Array.from({ length: doc.lineCount }, (_, i) => doc.lineAt(i).text.length);
  return commandRange({ start: { line: start.line, character: start.character }, end: { line: end.line, character: end.character } }, lengths);
}

function withProgress<T>(title: string, task: (token: vscode.CancellationToken) => Promise<T>): Thenable<T | undefined> {
  const options = { location: vscode.ProgressLocation.Notification, title: `Code Llama: ${title}…`, cancellable: true };
  return vscode.window.withProgress(options, async (_progress, token) => {
    try {
      return await task(token);
    } catch (error) {
      if (!token.isCancellationRequested) {
        void vscode.window.showErrorMessage(`Code Llama: ${error instanceof Error ? error.message : String(error)}`);
      }
      return undefined;
    }
  });
}

/** Shows an Explain answer; used by the palette command and by code actions. */
export async function showExplanation(view: ExplainView, document: vscode.TextDocument, range: LineRange, result: unknown): Promise<void> {
  const markdown = markdownOf(result);
  if (markdown === undefined) {
    void vscode.window.showWarningMessage('Code Llama: the server sent no explanation.');
    return;
  }
  await view.show(explainSource(document, range), markdown);
}

/** Explain run from a code action: its arguments are `[uri, range]`. */
export async function showCodeActionExplanation(view: ExplainView, args: unknown[], result: unknown): Promise<void> {
  const [uri, range] = args as [string | undefined, LineRange | undefined];
  const document = vscode.workspace.textDocuments.find((doc) => doc.uri.toString() === uri);
  if (document && range) {
    await showExplanation(view, document, range, result);
  }
}
