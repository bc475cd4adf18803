// The official JavaScript client (@c8y/client) onboarding a device against the platform, as an
// operator's app and a device would: register, poll as the bootstrap login, accept, poll again for
// credentials, work as the device; bulk registration from a CSV; inventory.count. Run by
// tests/test_c8y_js_client.py, which passes the server and logins in the environment and checks
// the JSON this prints (one object on the last line).
'use strict';

const { BasicAuth, Client } = require('@c8y/client');

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
};

const url = env('PLATFORM_URL');
const tenant = env('TENANT');
const serial = env('SERIAL');
const bootstrap = { basicAuth: { user: 'management/devicebootstrap', pass: env('BOOTSTRAP_PASSWORD') } };
const admin = new Client(new BasicAuth({ tenant, user: env('ADMIN_USER'), password: env('ADMIN_PASSWORD') }), url);

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// The status of a refused call: the client throws {res, data} (or an Error for a network fault).
async function refusedStatus(call) {
  try {
    await call();
  } catch (error) {
    if (error && error.res) return error.res.status;
    throw error;
  }
  return null;
}

async function main() {
  const result = {};
  result.countBefore = (await admin.inventory.count({ fragmentType: 'c8y_IsDevice' })).data;

  const created = await admin.deviceRegistration.create({ id: serial });
  result.created = { status: created.res.status, body: created.data };

  // The device's first poll: not accepted yet (404), and now the request awaits acceptance.
  result.firstPoll = await refusedStatus(() => admin.deviceRegistration.bootstrap(serial, bootstrap));
  result.afterPoll = (await admin.deviceRegistration.detail(serial)).data.status;

  const accepted = await admin.deviceRegistration.accept(serial);
  result.accepted = { status: accepted.res.status, body: accepted.data };

  let credentials = null;
  for (let attempt = 0; attempt < 50 && credentials === null; attempt += 1) {
    try {
      const { res, data } = await admin.deviceRegistration.bootstrap(serial, bootstrap);
      result.credentialsStatus = res.status;
      credentials = data;
    } catch (error) {
      if (!error.res || error.res.status !== 404) throw error;
      await sleep(100);
    }
  }
  if (credentials === null) throw new Error('no credentials after 50 polls');
  result.credentialKeys = Object.keys(credentials).sort();
  result.username = credentials.username;
  result.tenantId = credentials.tenantId;
  // Shown once: the next poll is refused like an unknown id.
  result.secondPoll = await refusedStatus(() => admin.deviceRegistration.bootstrap(serial, bootstrap));

  const device = new Client(
    new BasicAuth({ tenant: credentials.tenantId, user: credentials.username, password: credentials.password }),
    url,
  );
  const own = await device.inventory.create({ name: `JS device ${serial}`, c8y_IsDevice: {} });
  result.deviceCreate = { status: own.res.status, owner: own.data.owner };

  const csv = Buffer.from(`ID;CREDENTIALS;TYPE;NAME\n${serial}-b1;Secret-${serial}-1;c8y_Js;JS bulk 1\n;nope;x;y\n`);
  const bulk = await admin.deviceRegistrationBulk.create(csv);
  result.bulk = { status: bulk.res.status, body: bulk.data };

  const listed = await admin.deviceRegistration.list({ pageSize: 100 });
  result.listed = listed.data.map((request) => [request.id, request.status]);
  result.countAfter = (await admin.inventory.count({ fragmentType: 'c8y_IsDevice' })).data;

  await admin.deviceRegistration.delete(serial);
  result.afterDelete = await refusedStatus(() => admin.deviceRegistration.detail(serial));
  console.log(JSON.stringify(result));
}

main().catch((error) => {
  const detail = error && error.res ? { status: error.res.status, data: error.data } : String(error && error.stack);
  console.error('onboarding.cjs failed:', JSON.stringify(detail));
  process.exit(1);
});
