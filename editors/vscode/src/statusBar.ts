// The status bar item: follows `codellama/status` and the inline completion toggle.
import * as vscode from 'vscode';
import { ExtensionCommands } from './protocol';
import { formatStatus, type Status } from './status';

const BACKGROUNDS = {
  normal: undefined,
  warning: new vscode.ThemeColor('statusBarItem.warningBackground'),
  error: new vscode.ThemeColor('statusBarItem.errorBackground'),
};

export class StatusBar implements vscode.Disposable {
  private readonly item = vscode.window.createStatusBarItem('codellama.status', vscode.StatusBarAlignment.Right, 100);
  private status: Status = { state: 'starting', message: 'Starting the language server…' };
  private enabled = true;

  constructor() {
    this.item.name = 'Code Llama';
    this.item.command = ExtensionCommands.toggle;
    this.render();
    this.item.show();
  }

  get state(): Status['state'] {
    return this.status.state;
  }

  setStatus(status: Status): void {
    this.status = status;
    this.render();
  }

  setEnabled(enabled: boolean): void {
    this.enabled = enabled;
    this.render();
  }

  private render(): void {
    const view = formatStatus(this.status, this.enabled);
    this.item.text = view.text;
    this.item.tooltip = view.tooltip;
    this.item.backgroundColor = BACKGROUNDS[view.severity];
  }

  dispose(): void {
    this.item.dispose();
  }
}
