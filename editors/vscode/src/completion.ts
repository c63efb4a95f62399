// Plain helpers for inline completion items and the code action commands. No `vscode` import.

export interface CommandLike {
  command: string;
  arguments?: unknown[];
}

/**
 * The server's completion id, carried by the item's `codellama.acceptCompletion` command:
 * its first argument is either the id or an object with a `completionId` field.
 */
export function completionIdOf(command: CommandLike | undefined): string | undefined {
  const first = command?.arguments?.[0];
  if (typeof first === 'string' || typeof first === 'number') {
    return String(first);
  }
  if (typeof first === 'object' && first !== null) {
    const id = (first as Record<string, unknown>).completionId;
    return typeof id === 'string' || typeof id === 'number' ? String(id) : undefined;
  }
  return undefined;
}

export interface LineRange {
  start: { line: number; character: number };
  end: { line: number; character: number };
}

/**
 * The range a code action command works on: the selection when it is not empty, otherwise the
 * whole document (`lineLengths` holds each line's length).
 */
export function commandRange(selection: LineRange, lineLengths: readonly number[]): LineRange {
  const empty = selection.start.line === selection.end.line && selection.start.character === selection.end.character;
  if (!empty) {
    return selection;
  }
  const last = Math.max(0, lineLengths.length - 1);
  return { start: { line: 0, character: 0 }, end: { line: last, character: lineLengths[last] ?? 0 } };
}
