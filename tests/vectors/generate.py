#!/usr/bin/env python3
"""Generate webhook-signature test vectors with the reference implementations.

Re-run (from the repo root):

    python3 -m venv /tmp/vecenv
    /tmp/vecenv/bin/pip install standardwebhooks==1.1.0 stripe==16.1.0 githubkit==0.16.1 'hishel==1.4.0'
    /tmp/vecenv/bin/python tests/vectors/generate.py

(hishel is pinned because githubkit 0.16.1 allows hishel 2.0.0 but fails to
import with it: "cannot import name 'CachePolicy' from 'hishel'". githubkit
pulled in GitHubKit-schemas 26.10.21.)

Writes signatures.json next to this file. The output is deterministic: fixed
secrets, message ids and timestamps, no clock or randomness.

Provenance per scheme:
  * standard-webhooks: `standardwebhooks` (the Standard Webhooks reference
    library, github.com/standard-webhooks/standard-webhooks libraries/python),
    `Webhook.sign`, and every vector is re-checked with `Webhook.verify` (with
    the library's clock pinned to the vector's timestamp, because its 5-minute
    tolerance is hard-coded). Includes the spec's published vector, which is
    the library's own `test_sign_function` test case.
  * stripe: the official `stripe` SDK, `WebhookSignature.generate_signature_header`
    (which calls `WebhookSignature._compute_signature`), re-checked with
    `WebhookSignature.verify_header(..., tolerance=10**10)`.
  * github: GitHub's published example from the docs page "Validating webhook
    deliveries", confirmed with stdlib hmac; other vectors from `githubkit`
    (a third-party GitHub SDK; GitHub publishes no official Python webhook
    library) `githubkit.webhooks.sign`, re-checked with `githubkit.webhooks.verify`
    and stdlib hmac.
  * hmac-sha256 (Shopify style, X-Shopify-Hmac-Sha256 = base64(HMAC-SHA256(secret, body))):
    no reference library exists on PyPI for this, so Python's stdlib
    hmac/hashlib/base64 are the independent implementation.

Multi-signature (rotation) vectors exist only for schemes whose header format
carries several signatures: standard-webhooks (space-separated list) and
stripe (repeated v1=). GitHub's and Shopify's headers carry exactly one value.
"""

import base64
import hashlib
import hmac
import json
import os
import platform
from datetime import datetime, timezone
from importlib.metadata import version

import githubkit.webhooks
import standardwebhooks.webhooks as swh
import stripe

SWH_VER = f"standardwebhooks=={version('standardwebhooks')}"
STRIPE_VER = f"stripe=={version('stripe')}"
GHK_VER = f"githubkit=={version('githubkit')}"
PY_VER = f"python=={platform.python_version()}"

vectors = []


# ---------------------------------------------------------------- standard webhooks

def swh_verify(secret, body, headers, ts):
    """Webhook.verify with the library's clock pinned to ts (tolerance is fixed at 5 min)."""

    class PinnedDatetime(datetime):
        @classmethod
        def now(cls, tz=None):
            return datetime.fromtimestamp(ts, tz=tz or timezone.utc)

    real = swh.datetime
    swh.datetime = PinnedDatetime
    try:
        swh.Webhook(secret).verify(body, headers, json_parse=False)
        try:  # and a tampered body must be rejected
            swh.Webhook(secret).verify(body + " ", headers, json_parse=False)
        except swh.WebhookVerificationError:
            pass
        else:
            raise AssertionError("standardwebhooks accepted a tampered body")
    finally:
        swh.datetime = real


def swh_sign(secret, msg_id, ts, body):
    return swh.Webhook(secret).sign(
        msg_id=msg_id, timestamp=datetime.fromtimestamp(ts, tz=timezone.utc), data=body
    )


def add_swh(secret, msg_id, ts, body, signature_header, produced_by):
    headers = {
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": signature_header,
    }
    swh_verify(secret, body, headers, ts)
    vectors.append(
        {
            "scheme": "standard-webhooks",
            "secret": secret,
            "body": body,
            "headers": headers,
            "timestamp": ts,
            "produced_by": produced_by,
        }
    )


# 1. The published spec vector (the reference library's own test_sign_function case).
spec_secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
spec_id = "msg_p5jXN8AQM9LWM0D4loKWxJek"
spec_ts = 1614265330
spec_body = '{"test": 2432232314}'
spec_sig = swh_sign(spec_secret, spec_id, spec_ts, spec_body)
assert spec_sig == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=", spec_sig
add_swh(spec_secret, spec_id, spec_ts, spec_body, spec_sig,
        f"{SWH_VER}: Webhook.sign (published Standard Webhooks test vector, reproduced and verified)")

# 2. A 32-byte key (its base64 carries '=' padding) on a realistic body.
secret_32 = "whsec_" + base64.b64encode(b"sprintlink-vector-key-0123456789").decode()
body_a = '{"id":"evt_1","type":"object.created","data":{"object_id":123,"lead_id":8473}}'
add_swh(secret_32, "msg_2Yw4Xq1bG8hTn3Kd", 1700000000, body_a,
        swh_sign(secret_32, "msg_2Yw4Xq1bG8hTn3Kd", 1700000000, body_a),
        f"{SWH_VER}: Webhook.sign")

# 3. Rotation: header lists a signature from an old secret, then the current one.
secret_24 = "whsec_" + base64.b64encode(b"sprintlink-current-key!!").decode()
secret_old = "whsec_" + base64.b64encode(b"sprintlink-retired-key!!").decode()
body_b = '{"id":"evt_2","type":"object.updated","data":{"object_id":124,"lead_id":8474,"changes":{"status":["open","won"]}}}'
rot_id, rot_ts = "msg_2Yw4Xq1bG8hTn3Ke", 1700000300
rot_header = " ".join(
    [swh_sign(secret_old, rot_id, rot_ts, body_b), swh_sign(secret_24, rot_id, rot_ts, body_b)]
)
# sanity: the old secret's signature alone must not verify under the current secret
try:
    swh_verify(secret_24, body_b, {"webhook-id": rot_id, "webhook-timestamp": str(rot_ts),
                                   "webhook-signature": rot_header.split(" ")[0]}, rot_ts)
except swh.WebhookVerificationError:
    pass
else:
    raise AssertionError("retired-secret signature verified under the current secret")
add_swh(secret_24, rot_id, rot_ts, body_b, rot_header,
        f"{SWH_VER}: Webhook.sign x2 (retired secret {secret_old}, then the vector's secret), joined with a space")


# ---------------------------------------------------------------- stripe

def add_stripe(secret, ts, body, header, produced_by):
    WS = stripe.WebhookSignature
    assert WS.verify_header(body, header, secret, tolerance=10**10) is True
    try:
        WS.verify_header(body + " ", header, secret, tolerance=10**10)
    except stripe.SignatureVerificationError:
        pass
    else:
        raise AssertionError("stripe accepted a tampered body")
    vectors.append(
        {
            "scheme": "stripe",
            "secret": secret,
            "body": body,
            "headers": {"stripe-signature": header},
            "timestamp": ts,
            "produced_by": produced_by,
        }
    )


stripe_secret = "whsec_test_secret"
body_s1 = '{"id":"evt_1","type":"object.created","data":{"object_id":123,"lead_id":8473}}'
h1 = stripe.WebhookSignature.generate_signature_header(body_s1, stripe_secret, timestamp=1700000000)
# cross-check against the lower-level primitive
assert h1 == "t=1700000000,v1=" + stripe.WebhookSignature._compute_signature(
    "1700000000." + body_s1, stripe_secret)
add_stripe(stripe_secret, 1700000000, body_s1, h1,
           f"{STRIPE_VER}: WebhookSignature.generate_signature_header (-> _compute_signature)")

stripe_secret2 = "whsec_1a2b3c4d5e6f7g8h9i0jKLMNOPqrstuv"
body_s2 = ('{"id":"evt_3","object":"event","type":"invoice.paid","created":1700000600,'
           '"data":{"object":{"id":"in_9","amount_paid":4200,"currency":"eur","customer_name":"Zoë Müller"}}}')
add_stripe(stripe_secret2, 1700000600, body_s2,
           stripe.WebhookSignature.generate_signature_header(body_s2, stripe_secret2, timestamp=1700000600),
           f"{STRIPE_VER}: WebhookSignature.generate_signature_header (-> _compute_signature)")

# Rotation: t=...,v1=<retired secret>,v1=<current secret> as Stripe sends during a secret roll.
stripe_old = "whsec_test_secret_retired"
body_s3 = '{"id":"evt_2","type":"object.updated","data":{"object_id":124,"lead_id":8474}}'
ts3 = 1700000300
sig_old = stripe.WebhookSignature._compute_signature(f"{ts3}.{body_s3}", stripe_old)
sig_new = stripe.WebhookSignature._compute_signature(f"{ts3}.{body_s3}", stripe_secret)
h3 = f"t={ts3},v1={sig_old},v1={sig_new}"
try:
    stripe.WebhookSignature.verify_header(body_s3, f"t={ts3},v1={sig_old}", stripe_secret, tolerance=10**10)
except stripe.SignatureVerificationError:
    pass
else:
    raise AssertionError("retired-secret stripe signature verified")
add_stripe(stripe_secret, ts3, body_s3, h3,
           f"{STRIPE_VER}: WebhookSignature._compute_signature x2 (retired secret {stripe_old}, then the vector's secret), joined as t=,v1=,v1=")


# ---------------------------------------------------------------- github

def add_github(secret, body, sig, produced_by):
    stdlib = "sha256=" + hmac.new(secret.encode(), body.encode(), hashlib.sha256).hexdigest()
    assert sig == stdlib, (sig, stdlib)
    assert githubkit.webhooks.verify(secret, body.encode(), sig) is True
    assert githubkit.webhooks.verify(secret, (body + " ").encode(), sig) is False
    vectors.append(
        {
            "scheme": "github",
            "secret": secret,
            "body": body,
            "headers": {"x-hub-signature-256": sig},
            "timestamp": None,
            "produced_by": produced_by,
        }
    )


add_github("It's a Secret to Everybody", "Hello, World!",
           "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17",
           f"GitHub docs 'Validating webhook deliveries' published example; confirmed with {PY_VER} hmac and {GHK_VER}: webhooks.verify")

gh_secret = "sprintlink-github-secret"
body_g = ('{"action":"opened","issue":{"id":1,"number":42,"title":"Lead 8473 stuck","body":"Stöt på fel\\nline 2"},'
          '"repository":{"id":123,"full_name":"acme/sprintlink"},"sender":{"login":"octocat"}}')
add_github(gh_secret, body_g, githubkit.webhooks.sign(gh_secret, body_g.encode(), "sha256"),
           f"{GHK_VER}: webhooks.sign(method='sha256'); confirmed with {PY_VER} hmac and githubkit webhooks.verify")


# ---------------------------------------------------------------- hmac-sha256 (Shopify style)

def add_hmac(secret, body, produced_by):
    sig = base64.b64encode(hmac.new(secret.encode(), body.encode(), hashlib.sha256).digest()).decode()
    vectors.append(
        {
            "scheme": "hmac-sha256",
            "secret": secret,
            "body": body,
            "headers": {"x-shopify-hmac-sha256": sig},
            "timestamp": None,
            "produced_by": produced_by,
        }
    )


hmac_note = f"{PY_VER} stdlib: base64.b64encode(hmac.new(secret, body, hashlib.sha256).digest()) (independent implementation; no reference library)"
add_hmac("shpss_sprintlink_test_secret",
         '{"id":"evt_1","type":"object.created","data":{"object_id":123,"lead_id":8473}}', hmac_note)
add_hmac("hush",
         '{"id":820982911946154508,"email":"jon@example.com","total_price":"199.00","note":"Zoë ☕","line_items":[]}\n',
         hmac_note)


# ---------------------------------------------------------------- write

out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "signatures.json")
with open(out, "w", encoding="utf-8") as f:
    json.dump(vectors, f, indent=2, ensure_ascii=False)
    f.write("\n")

counts = {}
for v in vectors:
    counts[v["scheme"]] = counts.get(v["scheme"], 0) + 1
print(f"wrote {len(vectors)} vectors to {out}: {counts}")
