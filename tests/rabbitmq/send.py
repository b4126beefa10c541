"""send.py HOST PORT CAFILE USER PASS ADDRESS N SHAPE: an independent AMQP 1.0 sender for
iot-sub's interop tests (python-qpid-proton), over TLS with SASL PLAIN, checking the broker's
certificate chain and host name. Exits 0 when the broker accepted all N messages.

Adapted from the sender of the project's tested RabbitMQ recipe (rabbitmq-amqp10.sh, check.py).
Message i (0-based) in each SHAPE:
  plain  : one data section b"payload-%05d"; properties message-id "msg-%05d", subject "s<i>",
           content-type, creation-time 1714528800 + i seconds; application properties
           {seq: i, kind: "test"}. Nothing of Aliyun's.
  large  : as plain, with 16 KiB of "x" after the payload (to fill a pipe).
  aliyun : Aliyun's application properties: topic "/a1Test/dev<i%3>/thing/event/property/post",
           messageId "17000000000000000<i:02>", generateTime 1714528800000 + i (long); a JSON
           data body {"seq": i}; no properties section.
  bare   : one data section b"bare-%05d" and nothing else (no id, subject or properties).
"""
import json, sys
from proton import Message, SSLDomain
from proton.handlers import MessagingHandler
from proton.reactor import Container

host, port, ca, user, pw, addr, n, shape = sys.argv[1:9]
n = int(n)


def message(i):
    if shape in ("plain", "large"):
        body = b"payload-%05d" % i
        if shape == "large":
            body += b" " + b"x" * 16384
        return Message(body=body, inferred=True, durable=True, id="msg-%05d" % i,
                       subject="s%d" % i, content_type="text/plain",
                       creation_time=1714528800.0 + i, properties={"seq": i, "kind": "test"})
    if shape == "aliyun":
        return Message(body=json.dumps({"seq": i}).encode(), inferred=True, durable=True,
                       properties={"topic": "/a1Test/dev%d/thing/event/property/post" % (i % 3),
                                   "messageId": "17000000000000000%02d" % i,
                                   "generateTime": 1714528800000 + i})
    if shape == "bare":
        return Message(body=b"bare-%05d" % i, inferred=True, durable=True)
    sys.exit("unknown shape %r" % shape)


class Sender(MessagingHandler):
    def __init__(self):
        super().__init__()
        self.sent = self.accepted = self.other = 0

    def on_start(self, e):
        dom = SSLDomain(SSLDomain.MODE_CLIENT)
        dom.set_trusted_ca_db(ca)
        dom.set_peer_authentication(SSLDomain.VERIFY_PEER_NAME)
        conn = e.container.connect("amqps://%s:%s" % (host, port), ssl_domain=dom, user=user,
                                   password=pw, allowed_mechs="PLAIN", sasl_enabled=True)
        e.container.create_sender(conn, addr)
        self.timer = e.container.schedule(20, self)

    def on_sendable(self, e):
        while e.sender.credit and self.sent < n:
            e.sender.send(message(self.sent))
            self.sent += 1

    def on_accepted(self, e):
        self.accepted += 1
        self._done(e)

    def on_rejected(self, e):
        self.other += 1
        self._done(e)

    def on_released(self, e):
        self.other += 1
        self._done(e)

    def _done(self, e):
        if self.accepted + self.other == n:
            self.timer.cancel()
            e.connection.close()

    def on_timer_task(self, e):
        print("send.py: timed out after 20 s", file=sys.stderr)
        e.container.stop()


h = Sender()
Container(h).run()
print(json.dumps(dict(shape=shape, sent=h.sent, accepted=h.accepted, other=h.other)))
sys.exit(0 if h.accepted == n else 1)
