// The extension's settings (`codellama.*`), their validation, and their mapping onto the
// server's initializationOptions / didChangeConfiguration payload. No `vscode` import.

/** Sections of the server's settings object (the server's config.py is the source of truth). */
export type WireSection = 'model' | 'completion' | 'actions' | 'server';
export type WireValue = string | number | boolean | string[];
export type InitializationOptions = Partial<Record<WireSection, Record<string, WireValue>>>;

type Kind =
  | { type: 'boolean' }
  | { type: 'string' }
  | { type: 'stringArray' }
  | { type: 'enum'; values: readonly string[] }
  | { type: 'integer'; min: number; max?: number }
  | { type: 'number'; min: number; max: number; exclusiveMin?: boolean };

export interface SettingSpec {
  /** Key below `codellama.`; for server settings it is `section.name` of the wire object. */
  readonly key: string;
  readonly kind: Kind;
  /** `server`: forwarded to the language server; `client`: read by the extension only. */
  readonly target: 'server' | 'client';
  /** A change needs a new server process (the model is loaded at start). */
  readonly restart?: boolean;
}

const int = (min: number, max?: number): Kind => (max === undefined ? { type: 'integer', min } : { type: 'integer', min, max });
const num = (min: number, max: number, exclusiveMin = false): Kind => ({ type: 'number', min, max, exclusiveMin });
const str: Kind = { type: 'string' };
const oneOf = (...values: string[]): Kind => ({ type: 'enum', values });

export const SETTINGS: readonly SettingSpec[] = [
  { key: 'enable', kind: { type: 'boolean' }, target: 'client' },
  { key: 'server.command', kind: str, target: 'client', restart: true },
  { key: 'server.pythonPath', kind: str, target: 'client', restart: true },
  { key: 'server.args', kind: { type: 'stringArray' }, target: 'client', restart: true },
  { key: 'server.logLevel', kind: oneOf('debug', 'info', 'warning', 'error'), target: 'server' },
  { key: 'model.ckptDir', kind: str, target: 'server', restart: true },
  { key: 'model.tokenizerPath', kind: str, target: 'server', restart: true },
  { key: 'model.nproc', kind: int(1, 64), target: 'server', restart: true },
  { key: 'model.device', kind: oneOf('auto', 'cpu', 'cuda'), target: 'server', restart: true },
  { key: 'model.dtype', kind: oneOf('bfloat16', 'float16', 'float32'), target: 'server', restart: true },
  { key: 'model.maxSeqLen', kind: int(64), target: 'server', restart: true },
  { key: 'model.maxBatchSize', kind: int(1), target: 'server', restart: true },
  { key: 'completion.fimFormat', kind: oneOf('psm', 'spm', 'auto'), target: 'server' },
  { key: 'completion.maxTokensSingleLine', kind: int(1), target: 'server' },
  { key: 'completion.maxTokensMultiline', kind: int(1), target: 'server' },
  { key: 'completion.temperature', kind: num(0, 2), target: 'server' },
  { key: 'completion.topP', kind: num(0, 1, true), target: 'server' },
  { key: 'completion.numCandidates', kind: int(1, 8), target: 'server' },
  { key: 'completion.contextTokens', kind: int(0), target: 'server' },
  { key: 'completion.debounceMs', kind: int(0), target: 'server' },
  { key: 'completion.languages', kind: { type: 'stringArray' }, target: 'server' },
  { key: 'actions.instructCkptDir', kind: str, target: 'server', restart: true },
  { key: 'actions.safetyCommand', kind: str, target: 'server' },
  { key: 'actions.maxGenLen', kind: int(1), target: 'server' },
  { key: 'actions.temperature', kind: num(0, 2), target: 'server' },
];

export interface Settings {
  enable: boolean;
  server: { command: string; pythonPath: string; args: string[] };
  /** Language ids with inline completions; empty means all. */
  languages: string[];
  /** Only the values the user set (valid ones); the server supplies the rest. */
  initializationOptions: InitializationOptions;
  /** Same values as a flat map by key, used to decide whether a change needs a restart. */
  values: ReadonlyMap<string, WireValue>;
}

export interface ReadResult {
  settings: Settings;
  /** One readable line per invalid value (the value is dropped: the default applies). */
  problems: string[];
}

export const DEFAULT_SERVER_COMMAND = 'codellama-lsp';

type Checked = { value: WireValue | undefined } | { problem: string };

/** Reads every setting through `get(key)` (key below `codellama.`) and validates it. */
export function readSettings(get: (key: string) => unknown): ReadResult {
  const values = new Map<string, WireValue>();
  const problems: string[] = [];
  for (const spec of SETTINGS) {
    const checked = checkValue(spec.kind, get(spec.key));
    if ('problem' in checked) {
      problems.push(`codellama.${spec.key}: ${checked.problem}; using the default.`);
    } else if (checked.value !== undefined) {
      values.set(spec.key, checked.value);
    }
  }
  return { settings: toSettings(values), problems };
}

function toSettings(values: Map<string, WireValue>): Settings {
  const initializationOptions: InitializationOptions = {};
  for (const spec of SETTINGS) {
    const value = values.get(spec.key);
    if (spec.target !== 'server' || value === undefined) {
      continue;
    }
    const [section, name] = splitKey(spec.key);
    (initializationOptions[section] ??= {})[name] = value;
  }
  return {
    enable: values.get('enable') !== false,
    server: {
      command: asString(values.get('server.command')) ?? DEFAULT_SERVER_COMMAND,
      pythonPath: asString(values.get('server.pythonPath')) ?? '',
      args: asStrings(values.get('server.args')),
    },
    languages: asStrings(values.get('completion.languages')),
    initializationOptions,
    values,
  };
}

function splitKey(key: string): [WireSection, string] {
  const dot = key.indexOf('.');
  return [key.slice(0, dot) as WireSection, key.slice(dot + 1)];
}

const asString = (v: WireValue | undefined): string | undefined => (typeof v === 'string' ? v : undefined);
const asStrings = (v: WireValue | undefined): string[] => (Array.isArray(v) ? v : []);

/** Validates one raw value: `undefined` value means "not set" (null, empty string or list). */
export function checkValue(kind: Kind, raw: unknown): Checked {
  if (raw === undefined || raw === null || raw === '') {
    return { value: undefined };
  }
  switch (kind.type) {
    case 'boolean':
      return typeof raw === 'boolean' ? { value: raw } : { problem: `expected true or false, got ${show(raw)}` };
    case 'string':
      return typeof raw === 'string' ? { value: raw.trim() || undefined } : { problem: `expected a string, got ${show(raw)}` };
    case 'stringArray':
      return checkStrings(raw);
    case 'enum':
      return typeof raw === 'string' && kind.values.includes(raw)
        ? { value: raw }
        : { problem: `expected one of ${kind.values.join(', ')}, got ${show(raw)}` };
    case 'integer':
      return typeof raw === 'number' && Number.isInteger(raw) && raw >= kind.min && raw <= (kind.max ?? Infinity)
        ? { value: raw }
        : { problem: `expected an integer ≥ ${kind.min}${kind.max === undefined ? '' : ` and ≤ ${kind.max}`}, got ${show(raw)}` };
    case 'number':
      return checkNumber(kind, raw);
  }
}

function checkStrings(raw: unknown): Checked {
  if (!Array.isArray(raw) || !raw.every((item) => typeof item === 'string')) {
    return { problem: `expected a list of strings, got ${show(raw)}` };
  }
  return { value: raw.length > 0 ? raw : undefined };
}

function checkNumber(kind: Extract<Kind, { type: 'number' }>, raw: unknown): Checked {
  const low = kind.exclusiveMin ? `> ${kind.min}` : `≥ ${kind.min}`;
  if (typeof raw !== 'number' || !Number.isFinite(raw)) {
    return { problem: `expected a number, got ${show(raw)}` };
  }
  const tooLow = kind.exclusiveMin ? raw <= kind.min : raw < kind.min;
  return tooLow || raw > kind.max ? { problem: `expected a number ${low} and ≤ ${kind.max}, got ${raw}` } : { value: raw };
}

const show = (raw: unknown): string => JSON.stringify(raw) ?? String(raw);

/**
 * True when going from `before` to `after` needs a new server process: a model path or the
 * command changed, or a server setting was cleared (the server keeps values it was sent, so only
 * a fresh start brings its default back).
 */
export function needsRestart(before: Settings, after: Settings): boolean {
  return SETTINGS.some((spec) => {
    const old = before.values.get(spec.key);
    const now = after.values.get(spec.key);
    const cleared = spec.target === 'server' && old !== undefined && now === undefined;
    return cleared || (spec.restart === true && JSON.stringify(old) !== JSON.stringify(now));
  });
}

/** Whether inline completions are wanted for a document of this language. */
export function completionsEnabledFor(settings: Settings, languageId: string): boolean {
  const langs = settings.languages;
  return settings.enable && (langs.length === 0 || langs.includes('*') || langs.includes(languageId));
}
