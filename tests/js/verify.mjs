// DKIM verification independent of dkimpy: mailauth (Node's crypto, its own canonicalisation).
//
// Usage: node verify.mjs MESSAGE_FILE RECORDS_JSON
//   MESSAGE_FILE  the raw message bytes (RFC 5322, CRLF line ends)
//   RECORDS_JSON  {"selector._domainkey.example.com": "v=DKIM1; k=rsa; p=...", ...}
// Prints {headerFrom, signatures: [{domain, selector, algorithm, canonicalization, result,
//   comment, signedHeaders}], lookups}.
// DNS is never queried: names missing from RECORDS_JSON answer ENOTFOUND.

import { readFile } from 'node:fs/promises';
import { dkimVerify } from 'mailauth/lib/dkim/verify.js';

const [messagePath, recordsPath] = process.argv.slice(2);
if (!messagePath || !recordsPath) {
    process.stderr.write('usage: node verify.mjs MESSAGE_FILE RECORDS_JSON\n');
    process.exit(2);
}

const message = await readFile(messagePath);
const records = JSON.parse(await readFile(recordsPath, 'utf8'));
const txt = new Map(
    Object.entries(records).map(([name, value]) => [name.toLowerCase().replace(/\.$/, ''), value])
);
const lookups = [];

// Same shape as dns.promises.resolve(name, 'TXT'): one array of strings per record.
async function resolver(name, rrtype) {
    const key = String(name).toLowerCase().replace(/\.$/, '');
    lookups.push({ name: key, type: rrtype });
    if (rrtype === 'TXT' && txt.has(key)) {
        return [[txt.get(key)]];
    }
    const err = new Error(`no ${rrtype} record for ${key}`);
    err.code = 'ENOTFOUND';
    throw err;
}

const verdict = await dkimVerify(message, { resolver });
const signatures = verdict.results
    .filter(r => r.signingDomain !== undefined)
    .map(r => ({
        domain: r.signingDomain,
        selector: r.selector,
        algorithm: r.algo,
        canonicalization: r.format,
        result: r.status.result,
        comment: r.status.comment ?? null,
        // the header fields mailauth found and hashed, in h= order (an absent oversigned name adds none)
        signedHeaders: (r.signingHeaders?.keys || '').split(/\s*:\s*/).filter(Boolean)
    }));

process.stdout.write(JSON.stringify({ headerFrom: verdict.headerFrom, signatures, lookups }, null, 2) + '\n');
