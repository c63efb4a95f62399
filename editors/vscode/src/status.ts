// Parsing of `codellama/status` notifications and the status bar text. No `vscode` import.

export type ServerState = 'loading' | 'ready' | 'restarting' | 'error';
/** Client-side states beside the server's: before the first notification, and after a stop. */
export type State = ServerState | 'starting' | 'stopped';

export interface Status {
  state: State;
  message: string;
  progress?: { done: number; total: number };
}

export interface StatusView {
  text: string;
  tooltip: string;
  severity: 'normal' | 'warning' | 'error';
}

const SERVER_STATES: readonly string[] = ['loading', 'ready', 'restarting', 'error'];

/** Validates a `codellama/status` payload; `undefined` when it is malformed. */
export function parseStatus(params: unknown): Status | undefined {
  if (typeof params !== 'object' || params === null) {
    return undefined;
  }
  const { state, message, progress } = params as Record<string, unknown>;
  if (typeof state !== 'string' || !SERVER_STATES.includes(state)) {
    return undefined;
  }
  const status: Status = { state: state as ServerState, message: typeof message === 'string' ? message : '' };
  const parsed = parseProgress(progress);
  if (parsed) {
    status.progress = parsed;
  }
  return status;
}

function parseProgress(progress: unknown): Status['progress'] {
  if (typeof progress !== 'object' || progress === null) {
    return undefined;
  }
  const { done, total } = progress as Record<string, unknown>;
  return typeof done === 'number' && typeof total === 'number' && total > 0 ? { done, total } : undefined;
}

/** Percentage of a progress report, clamped to 0..100. */
export function percent(progress: { done: number; total: number }): number {
  return Math.max(0, Math.min(100, Math.floor((100 * progress.done) / progress.total)));
}

const NAME = 'Code Llama';

/** Status bar text (with codicons), tooltip and severity for a status and the toggle. */
export function formatStatus(status: Status, enabled: boolean): StatusView {
  const toggleHint = enabled ? 'Click to turn inline completions off.' : 'Click to turn inline completions on.';
  const detail = status.message !== '' ? `${status.message}\n\n` : '';
  const tooltip = `${NAME}: ${status.state}\n${detail}${toggleHint}`;
  switch (status.state) {
    case 'starting':
      return { text: `$(loading~spin) ${NAME}`, tooltip, severity: 'normal' };
    case 'loading': {
      const share = status.progress ? ` ${percent(status.progress)}%` : '';
      return { text: `$(loading~spin) ${NAME}: loading${share}`, tooltip, severity: 'normal' };
    }
    case 'restarting':
      return { text: `$(loading~spin) ${NAME}: restarting`, tooltip, severity: 'warning' };
    case 'error':
      return { text: `$(error) ${NAME}`, tooltip, severity: 'error' };
    case 'stopped':
      return { text: `$(debug-stop) ${NAME}: stopped`, tooltip, severity: 'warning' };
    case 'ready':
      return enabled
        ? { text: `$(check) ${NAME}`, tooltip, severity: 'normal' }
        : { text: `$(circle-slash) ${NAME}: off`, tooltip, severity: 'normal' };
  }
}
