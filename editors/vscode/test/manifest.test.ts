// The package.json manifest agrees with the settings table and the commands the code registers.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { ExtensionCommands } from '../src/protocol';
import { SETTINGS } from '../src/settings';

interface Manifest {
  main: string;
  contributes: {
    configuration: { properties: Record<string, { description?: string; enum?: string[]; type: string | string[] }> };
    commands: { command: string; title: string }[];
    menus: Record<string, { command?: string; submenu?: string }[]>;
  };
}

const root = join(__dirname, '..', '..');
const manifest = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8')) as Manifest;
const properties = manifest.contributes.configuration.properties;

describe('package.json', () => {
  it('declares every setting of the table, with a description, and no others', () => {
    assert.deepEqual(Object.keys(properties).sort(), SETTINGS.map((s) => `codellama.${s.key}`).sort());
    for (const [key, property] of Object.entries(properties)) {
      assert.ok((property.description ?? '').length > 20, `${key} needs a description`);
    }
  });

  it('offers the same enum values as the validation (plus "" for the server default)', () => {
    for (const spec of SETTINGS) {
      if (spec.kind.type === 'enum') {
        const declared = (properties[`codellama.${spec.key}`]?.enum ?? []).filter((v) => v !== '');
        assert.deepEqual(declared, spec.kind.values, spec.key);
      }
    }
  });

  it('contributes every command the extension registers, with the editor ones in the context menu', () => {
    const declared = manifest.contributes.commands.map((c) => c.command).sort();
    assert.deepEqual(declared, Object.values(ExtensionCommands).sort());
    const context = (manifest.contributes.menus['codellama.editor.context'] ?? []).map((m) => m.command);
    assert.deepEqual(context, [ExtensionCommands.explain, ExtensionCommands.refactor, ExtensionCommands.addDocstring, ExtensionCommands.writeTests]);
  });

  it('points main at the compiled entry point', () => {
    assert.equal(manifest.main, './out/src/extension.js');
  });
});
