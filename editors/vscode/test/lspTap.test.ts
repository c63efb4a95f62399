import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { FrameParser } from '../e2e/lspTap';

const frame = (body: string): Buffer => {
  const bytes = Buffer.from(body, 'utf8');
  return Buffer.concat([Buffer.from(`Content-Length: ${bytes.length}\r\n\r\n`, 'ascii'), bytes]);
};

describe('FrameParser (the e2e stdio tap)', () => {
  it('splits a stream into JSON-RPC bodies, whatever the chunking', () => {
    const bodies: string[] = [];
    const parser = new FrameParser((body) => bodies.push(body));
    const stream = Buffer.concat([frame('{"id":1}'), frame('{"text":"héllo ✓"}'), frame('{}')]);
    for (let i = 0; i < stream.length; i += 7) {
      parser.push(stream.subarray(i, i + 7));
    }
    assert.deepEqual(bodies, ['{"id":1}', '{"text":"héllo ✓"}', '{}']);
  });

  it('accepts extra headers and any header case', () => {
    const bodies: string[] = [];
    const parser = new FrameParser((body) => bodies.push(body));
    parser.push(Buffer.from('content-length: 2\r\nContent-Type: application/vscode-jsonrpc; charset=utf-8\r\n\r\n{}', 'ascii'));
    assert.deepEqual(bodies, ['{}']);
  });
});
