// Names of the wire contract between the extension and codellama-lsp (see DESIGN.md,
// "Wire contract between the server and the editor clients"). No `vscode` import.

/** Commands the server executes through `workspace/executeCommand`. */
export const ServerCommands = {
  explain: 'codellama.explain',
  refactor: 'codellama.refactor',
  addDocstring: 'codellama.addDocstring',
  writeTests: 'codellama.writeTests',
  acceptCompletion: 'codellama.acceptCompletion',
} as const;

export type ServerCommand = (typeof ServerCommands)[keyof typeof ServerCommands];

/** Custom methods beside the standard LSP ones. */
export const Methods = {
  status: 'codellama/status',
  didShowCompletion: 'codellama/didShowCompletion',
  stats: 'codellama/stats',
} as const;

/** Commands this extension contributes to VS Code (package.json). */
export const ExtensionCommands = {
  toggle: 'codellama.toggle',
  explain: 'codellama.editor.explain',
  refactor: 'codellama.editor.refactor',
  addDocstring: 'codellama.editor.addDocstring',
  writeTests: 'codellama.editor.writeTests',
  restartServer: 'codellama.restartServer',
  showStats: 'codellama.showStats',
  showOutput: 'codellama.showOutput',
} as const;

/** `codellama/didShowCompletion` parameters. */
export interface DidShowCompletionParams {
  uri: string;
  completionId: string;
}
