// Shows Explain answers as read-only virtual Markdown documents in a side preview.
import * as vscode from 'vscode';
import { explainDocument, explainPath, type ExplainSource } from './markdown';

export const EXPLAIN_SCHEME = 'codellama-explain';
const KEEP = 20;

export class ExplainView implements vscode.TextDocumentContentProvider, vscode.Disposable {
  private readonly docs = new Map<string, string>();
  private readonly changed = new vscode.EventEmitter<vscode.Uri>();
  private serial = 0;
  readonly onDidChange = this.changed.event;

  provideTextDocumentContent(uri: vscode.Uri): string {
    return this.docs.get(uri.path) ?? '';
  }

  async show(source: ExplainSource, markdown: string): Promise<vscode.Uri> {
    const path = explainPath(source, ++this.serial);
    this.docs.set(path, explainDocument(source, markdown));
    for (const old of [...this.docs.keys()].slice(0, Math.max(0, this.docs.size - KEEP))) {
      this.docs.delete(old);
    }
    const uri = vscode.Uri.from({ scheme: EXPLAIN_SCHEME, path });
    await vscode.commands.executeCommand('markdown.showPreviewToSide', uri);
    return uri;
  }

  dispose(): void {
    this.changed.dispose();
  }
}

/** What an explanation is about, from a document and the range sent to the server. */
export function explainSource(document: vscode.TextDocument, range: { start: { line: number }; end: { line: number } }): ExplainSource {
  const fileName = document.uri.path.split('/').pop() ?? document.uri.toString();
  return { fileName, startLine: range.start.line, endLine: range.end.line };
}
