// Creates the LanguageClient: server command, document selector and middleware.
import * as vscode from 'vscode';
import {
  LanguageClient,
  type ClientCapabilities,
  type FeatureState,
  type LanguageClientOptions,
  type Middleware,
  type ServerOptions,
  type StaticFeature,
} from 'vscode-languageclient/node';
import { completionIdOf } from './completion';
import { Methods, ServerCommands, type DidShowCompletionParams } from './protocol';
import { buildServerCommand } from './serverCommand';
import { completionsEnabledFor, type Settings } from './settings';

/** What the middleware needs from the extension, at call time. */
export interface ClientHooks {
  settings(): Settings;
  /** Shows the answer of a `codellama.explain` run through a code action. */
  showExplanation(args: unknown[], result: unknown): Promise<void>;
  /** Asks for a Refactor instruction when a code action left it out. */
  askInstruction(): Promise<string | undefined>;
}

export function createLanguageClient(hooks: ClientHooks, output: vscode.LogOutputChannel): LanguageClient {
  const line = buildServerCommand(hooks.settings());
  // stdio without `transport`: TransportKind.stdio would append a `--stdio` flag to the command.
  const serverOptions: ServerOptions = { command: line.command, args: line.args };
  const clientOptions: LanguageClientOptions = {
    documentSelector: [{ scheme: 'file' }, { scheme: 'untitled' }],
    initializationOptions: () => hooks.settings().initializationOptions,
    outputChannel: output,
    middleware: middleware(hooks, () => client),
  };
  const client = new LanguageClient('codellama', 'Code Llama', serverOptions, clientOptions);
  client.registerFeature(explainResultFeature);
  return client;
}

/**
 * Announces `experimental.codellama.explainResult`: the server then answers `codellama.explain`
 * with the Markdown instead of opening a file through `window/showDocument`; we preview it.
 */
const explainResultFeature: StaticFeature = {
  fillClientCapabilities(capabilities: ClientCapabilities): void {
    const experimental = (capabilities.experimental ?? {}) as Record<string, unknown>;
    capabilities.experimental = { ...experimental, codellama: { explainResult: true } };
  },
  initialize: () => undefined,
  getState: (): FeatureState => ({ kind: 'static' }),
  clear: () => undefined,
};

function middleware(hooks: ClientHooks, client: () => LanguageClient): Middleware {
  return {
    async provideInlineCompletionItems(document, position, context, token, next) {
      if (!completionsEnabledFor(hooks.settings(), document.languageId)) {
        return undefined;
      }
      const result = await next(document, position, context, token);
      const first = Array.isArray(result) ? result[0] : result?.items[0];
      const completionId = completionIdOf(first?.command);
      if (completionId !== undefined && !token.isCancellationRequested) {
        const params: DidShowCompletionParams = { uri: client().code2ProtocolConverter.asUri(document.uri), completionId };
        void client().sendNotification(Methods.didShowCompletion, params);
      }
      return result;
    },
    async executeCommand(command, rawArgs: unknown[], next): Promise<unknown> {
      let args = rawArgs;
      if (command === ServerCommands.refactor && args.length < 3) {
        const instruction = await hooks.askInstruction();
        if (instruction === undefined) {
          return undefined;
        }
        args = [...args.slice(0, 2), instruction];
      }
      const result: unknown = await next(command, args);
      if (command === ServerCommands.explain) {
        await hooks.showExplanation(args, result);
      }
      return result;
    },
    workspace: {
      async configuration(params, token, next) {
        const result: unknown = await next(params, token);
        if (!Array.isArray(result)) {
          return result as ReturnType<typeof next>;
        }
        const values = result as unknown[];
        return params.items.map((item, i) => (item.section === 'codellama' ? hooks.settings().initializationOptions : values[i]));
      },
    },
  };
}
