//! The rhea row of the iot-sub benchmark: a receiver written like Aliyun's Node.js AMQP sample
//! (rhea, TLS, signed SASL PLAIN login, explicit accept), writing each message as the same JSON
//! line iot-sub writes, then accepting it. Exits 0 after --count messages.
//!
//! node receiver.js --host localhost --port 5671 --ca ca.pem --count 200000 \
//!   [--access-key-id bench-id] [--access-key-secret bench-secret] [--consumer-group-id DEFAULT_GROUP]
'use strict';

const container = require('rhea');
const crypto = require('crypto');
const fs = require('fs');

function option(name, fallback) {
  const i = process.argv.indexOf('--' + name);
  if (i >= 0 && i + 1 < process.argv.length) return process.argv[i + 1];
  if (fallback === undefined) {
    console.error(`receiver.js: --${name} is required`);
    process.exit(2);
  }
  return fallback;
}

const host = option('host', 'localhost');
const port = Number(option('port', '5671'));
const ca = fs.readFileSync(option('ca'));
const count = Number(option('count', '200000'));
const accessKey = option('access-key-id', 'bench-id');
const accessSecret = option('access-key-secret', 'bench-secret');
const consumerGroupId = option('consumer-group-id', 'DEFAULT_GROUP');
const clientId = 'rhea-bench-' + process.pid;

// The signed login, as in Aliyun's sample.
const timestamp = Date.now();
const signMethod = 'hmacsha1';
const userName = clientId + '|authMode=aksign' + ',signMethod=' + signMethod +
  ',timestamp=' + timestamp + ',authId=' + accessKey + ',iotInstanceId=' +
  ',consumerGroupId=' + consumerGroupId + '|';
const signContent = 'authId=' + accessKey + '&timestamp=' + timestamp;
const password = crypto.createHmac('sha1', accessSecret).update(signContent).digest('base64');

const connection = container.connect({
  host: host,
  port: port,
  transport: 'tls',
  ca: ca,
  reconnect: false,
  idle_time_out: 60000,
  username: userName,
  password: password,
});
connection.open_receiver({ autoaccept: false, credit_window: 1000 });

// Same classification as iot-sub: JSON, else UTF-8 text without control characters, else base64.
function bodyOf(buffer) {
  const text = buffer.toString('utf8');
  try {
    return ['json', JSON.parse(text)];
  } catch (e) {
    // not JSON
  }
  if (Buffer.from(text, 'utf8').equals(buffer) && !/[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]/.test(text)) {
    return ['text', text];
  }
  return ['base64', buffer.toString('base64')];
}

let accepted = 0;
container.on('message', function (context) {
  const msg = context.message;
  const props = Object.assign({}, msg.application_properties || {});
  const topic = props.topic;
  const messageId = props.messageId !== undefined ? String(props.messageId) : msg.message_id;
  const generateTime = props.generateTime !== undefined ? Number(props.generateTime) : null;
  delete props.topic;
  delete props.messageId;
  delete props.generateTime;
  const content = msg.body && msg.body.content !== undefined ? Buffer.from(msg.body.content) : Buffer.alloc(0);
  const [bodyEncoding, body] = bodyOf(content);
  const line = JSON.stringify({ topic, messageId, generateTime, properties: props, bodyEncoding, body });
  // As in the sample: write, then accept. Writes to a file (/dev/null) are synchronous in Node;
  // to a full pipe they are queued, so the exit below waits for stdout to drain.
  process.stdout.write(line + '\n');
  context.delivery.accept();
  accepted += 1;
  if (accepted === count) {
    context.connection.close();
  }
});

function exitAfterStdout(code) {
  process.stdout.write('', () => process.exit(code));
}

container.on('connection_close', function () {
  exitAfterStdout(accepted >= count ? 0 : 1);
});
container.on('disconnected', function (context) {
  console.error('receiver.js: disconnected', context.error ? String(context.error) : '');
  exitAfterStdout(accepted >= count ? 0 : 1);
});
container.on('error', function (context) {
  console.error('receiver.js: error', context.error ? String(context.error) : '');
  process.exit(1);
});
