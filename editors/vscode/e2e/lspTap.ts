// A transparent stdio proxy for end-to-end tests: `node lspTap.js LOG -- COMMAND ARGS...` runs the
// language server and records every JSON-RPC message of both directions in LOG, one JSON object
// a line: {"dir": "in" (editor to server) | "out", "t": ms since start, "message": {...}}.
import { spawn } from 'node:child_process';
import { appendFileSync, writeFileSync } from 'node:fs';

export class FrameParser {
  private buffer = Buffer.alloc(0);
  constructor(private readonly onMessage: (body: string) => void) {}

  push(chunk: Buffer): void {
    this.buffer = Buffer.concat([this.buffer, chunk]);
    for (;;) {
      const headerEnd = this.buffer.indexOf('\r\n\r\n');
      if (headerEnd < 0) {
        return;
      }
      const match = /content-length:\s*(\d+)/i.exec(this.buffer.subarray(0, headerEnd).toString('ascii'));
      const length = match ? Number(match[1]) : 0;
      const start = headerEnd + 4;
      if (this.buffer.length < start + length) {
        return;
      }
      this.onMessage(this.buffer.subarray(start, start + length).toString('utf8'));
      this.buffer = this.buffer.subarray(start + length);
    }
  }
}

function main(argv: string[]): void {
  const [log, separator, command, ...args] = argv;
  if (log === undefined || separator !== '--' || command === undefined) {
    process.stderr.write('usage: lspTap LOG -- COMMAND [ARGS...]\n');
    process.exit(2);
  }
  writeFileSync(log, '');
  const started = Date.now();
  const record = (dir: 'in' | 'out') => (body: string) => {
    let message: unknown = body;
    try {
      message = JSON.parse(body);
    } catch {
      // keep the raw text
    }
    appendFileSync(log, JSON.stringify({ dir, t: Date.now() - started, message }) + '\n');
  };
  const child = spawn(command, args, { stdio: ['pipe', 'pipe', 'inherit'] });
  const fromEditor = new FrameParser(record('in'));
  const fromServer = new FrameParser(record('out'));
  process.stdin.on('data', (chunk: Buffer) => {
    fromEditor.push(chunk);
    child.stdin.write(chunk);
  });
  process.stdin.on('end', () => child.stdin.end());
  child.stdout.on('data', (chunk: Buffer) => {
    fromServer.push(chunk);
    process.stdout.write(chunk);
  });
  child.on('exit', (code, signal) => process.exit(code ?? (signal ? 1 : 0)));
  for (const signal of ['SIGTERM', 'SIGINT'] as const) {
    process.on(signal, () => child.kill(signal));
  }
}

if (require.main === module) {
  main(process.argv.slice(2));
}
