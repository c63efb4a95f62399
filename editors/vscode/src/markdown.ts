// Markdown helpers for the code actions' answers. No `vscode` import.

/**
 * The Markdown text of an Explain answer. The server answers `workspace/executeCommand` with a
 * string, a MarkupContent `{kind, value}`, or an object with a `markdown` field.
 */
export function markdownOf(result: unknown): string | undefined {
  if (typeof result === 'string') {
    return result;
  }
  if (typeof result !== 'object' || result === null) {
    return undefined;
  }
  const record = result as Record<string, unknown>;
  for (const field of ['markdown', 'value', 'contents', 'text']) {
    const value = record[field];
    if (typeof value === 'string') {
      return value;
    }
  }
  return undefined;
}

export interface ExplainSource {
  /** The file's name without folders. */
  fileName: string;
  /** Zero-based, inclusive. */
  startLine: number;
  endLine: number;
}

/** A one-line title naming the explained lines, e.g. "Explanation of `a.py`, lines 3–7". */
export function explainTitle(source: ExplainSource): string {
  const first = source.startLine + 1;
  const last = source.endLine + 1;
  const lines = first === last ? `line ${first}` : `lines ${first}–${last}`;
  return `Explanation of \`${escapeCodeSpan(source.fileName)}\`, ${lines}`;
}

/** The document shown in the preview: a heading, then the server's Markdown as it came. */
export function explainDocument(source: ExplainSource, markdown: string): string {
  const body = markdown.trim() === '' ? '_The model gave an empty answer._' : markdown.trimEnd();
  return `# ${explainTitle(source)}\n\n${body}\n`;
}

/** A path for the virtual document of an explanation (unique per request). */
export function explainPath(source: ExplainSource, serial: number): string {
  const safe = source.fileName.replace(/[^\w.-]+/g, '_');
  return `/${safe}-L${source.startLine + 1}-${source.endLine + 1}-${serial}.md`;
}

function escapeCodeSpan(text: string): string {
  return text.replace(/`/g, "'");
}

/** A short human summary of a `codellama/stats` answer; unknown fields are listed as they are. */
export function formatStats(stats: unknown): string {
  if (typeof stats !== 'object' || stats === null) {
    return 'No statistics.';
  }
  return Object.entries(stats as Record<string, unknown>)
    .map(([key, value]) => `${key}: ${formatStatValue(value)}`)
    .join('; ');
}

function formatStatValue(value: unknown): string {
  if (typeof value === 'number') {
    return Number.isInteger(value) ? String(value) : value.toFixed(3);
  }
  if (typeof value === 'object' && value !== null) {
    return `{${formatStats(value).replace(/; /g, ', ')}}`;
  }
  return String(value);
}
