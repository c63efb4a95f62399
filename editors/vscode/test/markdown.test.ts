import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { explainDocument, explainPath, explainTitle, formatStats, markdownOf } from '../src/markdown';

describe('markdownOf', () => {
  it('reads strings, MarkupContent and {markdown}', () => {
    assert.equal(markdownOf('**hi**'), '**hi**');
    assert.equal(markdownOf({ kind: 'markdown', value: 'v' }), 'v');
    assert.equal(markdownOf({ markdown: 'm' }), 'm');
    assert.equal(markdownOf({ other: 1 }), undefined);
    assert.equal(markdownOf(null), undefined);
  });
});

describe('explainDocument', () => {
  const source = { fileName: 'a.py', startLine: 2, endLine: 6 };
  it('titles the explained lines, one-based', () => {
    assert.equal(explainTitle(source), 'Explanation of `a.py`, lines 3–7');
    assert.equal(explainTitle({ ...source, endLine: 2 }), 'Explanation of `a.py`, line 3');
  });
  it('keeps the server Markdown as it came under a heading', () => {
    assert.equal(explainDocument(source, 'It adds.\n\n```py\nx\n```\n\n'), '# Explanation of `a.py`, lines 3–7\n\nIt adds.\n\n```py\nx\n```\n');
  });
  it('says so when the answer is empty', () => {
    assert.match(explainDocument(source, '  \n'), /empty answer/);
  });
  it('makes safe, unique document paths', () => {
    assert.equal(explainPath({ fileName: 'my file?.py', startLine: 0, endLine: 0 }, 3), '/my_file_.py-L1-1-3.md');
  });
});

describe('formatStats', () => {
  it('summarises counts, rates and nested percentiles', () => {
    assert.equal(formatStats({ shown: 10, accepted: 4, acceptanceRate: 0.4, latencyMs: { p50: 12, p95: 40.25 } }), 'shown: 10; accepted: 4; acceptanceRate: 0.400; latencyMs: {p50: 12, p95: 40.250}');
    assert.equal(formatStats(undefined), 'No statistics.');
  });
});
