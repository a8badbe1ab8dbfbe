// A real OpenID provider for Deckard's single sign-on tests: node-oidc-provider (a certified implementation) with
// a password form, automatic consent for the configured clients, an RS256 key made at start, and nothing stored
// on disk.  Usage: node provider.mjs <config.json>; see README.md for the config and tests/oidc_provider.py.

import { generateKeyPair, createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createServer as createHttpServer } from 'node:http';
import { createServer as createHttpsServer } from 'node:https';
import { promisify } from 'node:util';

// the RSA key is made on libuv's thread pool while the main thread loads oidc-provider (each takes ~0.2-0.5 s)
const keyPair = promisify(generateKeyPair)('rsa', { modulusLength: 2048 });
const { default: Provider } = await import('oidc-provider');

const config = JSON.parse(readFileSync(process.argv[2], 'utf8'));
const users = new Map((config.users ?? []).map((user) => [user.login, user]));

const escapeHtml = (value) => String(value).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
const digest = (value) => createHash('sha256').update(String(value)).digest();

function checkPassword(login, password) {
  const user = users.get(login);
  // compare digests so a wrong password costs the same whatever its length
  const ok = timingSafeEqual(digest(user?.password ?? randomBytes(16)), digest(password));
  return ok && user ? user : null;
}

function page(title, body) {
  return `<!DOCTYPE html><html><head><meta charset="utf-8"><title>${escapeHtml(title)}</title></head>`
    + `<body><h1>${escapeHtml(title)}</h1>${body}</body></html>`;
}

function loginForm(uid, login = '', error = '') {
  return page('Sign in', `${error ? `<p class="error" role="alert">${escapeHtml(error)}</p>` : ''}
<form method="post" action="/interaction/${escapeHtml(uid)}/login" autocomplete="off">
  <label>Login <input type="text" name="login" value="${escapeHtml(login)}" required autofocus></label>
  <label>Password <input type="password" name="password" required></label>
  <button type="submit">Sign in</button>
</form>
<form method="post" action="/interaction/${escapeHtml(uid)}/abort"><button type="submit">Cancel</button></form>`);
}

async function readForm(req) {
  const chunks = [];
  for await (const chunk of req) chunks.push(chunk);
  return new URLSearchParams(Buffer.concat(chunks).toString('utf8'));
}

function send(res, status, html) {
  res.writeHead(status, { 'content-type': 'text/html; charset=utf-8', 'cache-control': 'no-store' });
  res.end(html);
}

const { privateKey } = await keyPair;
const signingKey = { ...privateKey.export({ format: 'jwk' }), kid: randomBytes(8).toString('hex'), alg: 'RS256', use: 'sig' };

// plain HTTP on loopback, or HTTPS when the config names a certificate and key (PEM files)
const server = config.tls
  ? createHttpsServer({ cert: readFileSync(config.tls.cert), key: readFileSync(config.tls.key) })
  : createHttpServer();
await new Promise((resolve) => server.listen(config.port ?? 0, '127.0.0.1', resolve));
const { port } = server.address();
const issuer = config.issuer ?? `${config.tls ? 'https' : 'http'}://127.0.0.1:${port}`;

const ttl = (seconds) => () => seconds;
const provider = new Provider(issuer, {
  clients: (config.clients ?? []).map(({ client_secret: secret, ...client }) => ({
    grant_types: ['authorization_code'],
    response_types: ['code'],
    token_endpoint_auth_method: secret ? 'client_secret_basic' : 'none',
    ...(secret ? { client_secret: secret } : {}),
    ...client,
  })),
  jwks: { keys: [signingKey] },
  cookies: { keys: [randomBytes(32).toString('hex')] },
  // the client reads the person's claims from the ID token, so put them there even though an access token exists
  conformIdTokenClaims: false,
  claims: {
    openid: ['sub'],
    profile: ['name', 'preferred_username', 'groups'],
    email: ['email', 'email_verified'],
    groups: ['groups'],
  },
  scopes: ['openid', 'profile', 'email', 'groups'],
  pkce: { required: () => true },
  features: {
    devInteractions: { enabled: false },
    rpInitiatedLogout: {
      enabled: true,
      logoutSource: async (ctx, form) => {
        ctx.body = page('Sign out', `${form}<button type="submit" form="op.logoutForm" name="logout" value="yes">Sign out</button>`);
      },
      postLogoutSuccessSource: async (ctx) => {
        ctx.body = page('Signed out', '<p>You are signed out.</p>');
      },
    },
  },
  async findAccount(ctx, sub) {
    const user = users.get(sub);
    if (!user) return undefined;
    return {
      accountId: sub,
      async claims() {
        return {
          sub,
          preferred_username: user.login,
          name: user.name ?? '',
          email: user.email ?? '',
          email_verified: Boolean(user.email),
          groups: user.groups ?? [],
        };
      },
    };
  },
  async renderError(ctx, out) {
    ctx.type = 'html';
    ctx.body = page('Error', Object.entries(out).map(([k, v]) => `<p><b>${escapeHtml(k)}</b>: ${escapeHtml(v)}</p>`).join(''));
  },
  clientBasedCORS: () => false,
  ttl: {
    AccessToken: ttl(600),
    AuthorizationCode: ttl(60),
    IdToken: ttl(600),
    Interaction: ttl(600),
    Session: ttl(3600),
    Grant: ttl(3600),
  },
});

const providerCallback = provider.callback();

async function interaction(req, res, uid, action) {
  const details = await provider.interactionDetails(req, res);
  if (details.uid !== uid) throw new Error('interaction mismatch');
  if (req.method === 'GET' && details.prompt.name === 'login') {
    send(res, 200, loginForm(uid));
  } else if (req.method === 'GET' && details.prompt.name === 'consent') {
    // the configured clients are Deckard itself: grant what it asked for without a consent click
    const grant = details.grantId
      ? await provider.Grant.find(details.grantId)
      : new provider.Grant({ accountId: details.session.accountId, clientId: details.params.client_id });
    const missing = details.prompt.details;
    if (missing.missingOIDCScope) grant.addOIDCScope(missing.missingOIDCScope.join(' '));
    if (missing.missingOIDCClaims) grant.addOIDCClaims(missing.missingOIDCClaims);
    for (const [indicator, scopes] of Object.entries(missing.missingResourceScopes ?? {})) {
      grant.addResourceScope(indicator, scopes.join(' '));
    }
    const grantId = await grant.save();
    await provider.interactionFinished(req, res, { consent: { grantId } }, { mergeWithLastSubmission: true });
  } else if (req.method === 'POST' && action === 'login') {
    const form = await readForm(req);
    const user = checkPassword(form.get('login') ?? '', form.get('password') ?? '');
    if (!user) {
      send(res, 200, loginForm(uid, form.get('login') ?? '', 'Wrong login or password.'));
      return;
    }
    await provider.interactionFinished(req, res, { login: { accountId: user.login } }, { mergeWithLastSubmission: false });
  } else if (req.method === 'POST' && action === 'abort') {
    await provider.interactionFinished(req, res, {
      error: 'access_denied',
      error_description: 'The person cancelled the sign-in.',
    }, { mergeWithLastSubmission: false });
  } else {
    send(res, 405, page('Error', '<p>method not allowed</p>'));
  }
}

server.on('request', async (req, res) => {
  const match = /^\/interaction\/([\w-]+)(?:\/(login|abort))?$/.exec(new URL(req.url, issuer).pathname);
  if (!match) {
    providerCallback(req, res);
    return;
  }
  try {
    await interaction(req, res, match[1], match[2]);
  } catch (err) {
    if (!res.headersSent) send(res, 400, page('Error', `<p>${escapeHtml(err.message)}</p>`));
  }
});

const stop = () => {
  server.closeAllConnections();
  server.close(() => process.exit(0));
};
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
// a test run killed outright cannot stop us: leave when our parent is gone rather than linger on a port
const parent = process.ppid;
setInterval(() => process.ppid !== parent && stop(), 1000).unref();
process.stdout.write(`READY ${port}\n`);
