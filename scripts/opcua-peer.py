#!/usr/bin/env python3
"""An OPC UA server that is not ours: asyncua (FreeOpcUa), on loopback.

    opcua-peer.py --port 4840 [--pki DIR] [--user NAME:PASSWORD] [--user-cert DIR] [--load N]

Serves `opc.tcp://127.0.0.1:<port>/millrace/` with the namespace
`urn:millrace:peer` and one object `Line1` holding variables of several
types (browse name, NodeId string, type, start value):

    Temperature  ns=2;s=Line1.Temperature  Double   20.0
    Count        ns=2;s=Line1.Count        Int32    0
    Running      ns=2;s=Line1.Running      Boolean  true
    Pressure     ns=2;s=Line1.Pressure     Float    1.0
    Energy       ns=2;s=Line1.Energy       UInt64   0
    Mode         ns=2;s=Line1.Mode         String   "auto"

Security: always `None`; with `--pki DIR` also Basic256Sha256 Sign and
SignAndEncrypt, with the server's certificate and key created in DIR on the
first run (`server-cert.der`, `server-key.pem`; kept across restarts, so a
client that trusts that file keeps trusting the restarted server). Client
certificates are accepted. Identity: anonymous, and with `--user` that user
name and password as well (then anonymous is refused). With `--user-cert DIR`
a user certificate and key are created in DIR (`user-cert.der`,
`user-key.pem`) and only an X509 identity with that certificate is accepted.

Prints `ready <endpoint-url>` once serving, then reads commands from stdin,
one per line, answering `ok <command>` once the value is written:

    set <name> <value> [<source-ms>]   write a value (source timestamp = now or <source-ms>)
    bad <name> [<source-ms>]           write status BadSensorFailure (the server nulls
                                       the value, as the specification requires)
    uncertain <name> <value> [<source-ms>]  write a value with UncertainLastUsableValue
    tick <n> <period-ms>               change Temperature and Count <n> times,
                                       <period-ms> apart (a schedule), then `ok`
    load <rounds> <period-ms>          with --load N: write a new value to each of the
                                       N Double variables ns=2;s=Load.<i> (object `Load`)
                                       once per round, rounds <period-ms> apart; answers
                                       `ok load … written=<values> seconds=<s>`

The server stops when stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import ipaddress
import logging
import sys
from pathlib import Path

try:
    from asyncua import Server, ua
    from asyncua.crypto.permission_rules import SimpleRoleRuleset, User, UserRole
    from asyncua.server.user_managers import UserManager
except ImportError as exc:  # pragma: no cover - environment check
    sys.exit(f"opcua-peer: asyncua is required ({exc}); pip install asyncua")

NAMESPACE = "urn:millrace:peer"
VARIABLES = {
    "Temperature": (ua.VariantType.Double, 20.0),
    "Count": (ua.VariantType.Int32, 0),
    "Running": (ua.VariantType.Boolean, True),
    "Pressure": (ua.VariantType.Float, 1.0),
    "Energy": (ua.VariantType.UInt64, 0),
    "Mode": (ua.VariantType.String, "auto"),
}


def parse(kind: ua.VariantType, text: str):
    if kind in (ua.VariantType.Double, ua.VariantType.Float):
        return float(text)
    if kind == ua.VariantType.Boolean:
        return text.lower() in ("1", "true", "yes")
    if kind == ua.VariantType.String:
        return text
    return int(text)


def stamp(ms: str | None) -> dt.datetime:
    if ms is None:
        return dt.datetime.now(dt.timezone.utc)
    return dt.datetime.fromtimestamp(int(ms) / 1000.0, dt.timezone.utc)


def make_certificate(pki: Path, uri: str, stem: str = "server") -> tuple[Path, Path]:
    """A self-signed certificate with the application URI as SAN."""
    cert_path, key_path = pki / f"{stem}-cert.der", pki / f"{stem}-key.pem"
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID, ExtendedKeyUsageOID

    pki.mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "millrace opcua peer")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(uri), x509.DNSName("localhost"),
                 x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=True, key_encipherment=True,
                data_encipherment=True, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.DER))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


class OneUser(UserManager):
    """Accepts one user name and password, or (with `cert_der`) one user certificate."""

    def __init__(self, name: str | None, password: str | None, cert_der: bytes | None = None):
        self.name, self.password, self.cert_der = name, password, cert_der

    def get_user(self, iserver, username=None, password=None, certificate=None):
        if self.name is not None and username == self.name and password == self.password:
            return User(role=UserRole.User)
        if self.cert_der is not None and certificate is not None:
            der = certificate
            if not isinstance(der, (bytes, bytearray)):
                from cryptography.hazmat.primitives import serialization

                der = certificate.public_bytes(serialization.Encoding.DER)
            if bytes(der) == self.cert_der:
                return User(role=UserRole.User, name="certificate-user")
        return None


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--pki", type=Path, help="enable Basic256Sha256 with a certificate kept here")
    ap.add_argument("--user", help="NAME:PASSWORD required instead of anonymous")
    ap.add_argument("--load", type=int, default=0, help="N load variables ns=2;s=Load.<i>")
    ap.add_argument("--user-cert", type=Path, help="create a user certificate here and require it")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    uri = "urn:millrace:opcua-peer"
    user_manager = None
    name = password = cert_der = None
    if args.user:
        name, _, password = args.user.partition(":")
    if args.user_cert:
        user_cert, _ = make_certificate(args.user_cert, "urn:millrace:opcua-user", stem="user")
        cert_der = user_cert.read_bytes()
    if args.user or args.user_cert:
        user_manager = OneUser(name, password, cert_der)
    server = Server(user_manager=user_manager)
    await server.init()
    endpoint = f"opc.tcp://127.0.0.1:{args.port}/millrace/"
    server.set_endpoint(endpoint)
    server.set_server_name("millrace opcua peer")
    await server.set_application_uri(uri)
    policies = [ua.SecurityPolicyType.NoSecurity]
    if args.pki:
        cert, key = make_certificate(args.pki, uri)
        await server.load_certificate(str(cert))
        await server.load_private_key(str(key))
        policies += [
            ua.SecurityPolicyType.Basic256Sha256_Sign,
            ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
        ]
    server.set_security_policy(policies, permission_ruleset=SimpleRoleRuleset())
    if args.user or args.user_cert:
        server.set_identity_tokens([ua.UserNameIdentityToken, ua.X509IdentityToken])
    else:
        server.set_identity_tokens(
            [ua.AnonymousIdentityToken, ua.UserNameIdentityToken, ua.X509IdentityToken]
        )

    ns = await server.register_namespace(NAMESPACE)
    line = await server.nodes.objects.add_object(ua.NodeId("Line1", ns), ua.QualifiedName("Line1", ns))
    nodes = {}
    for name, (kind, value) in VARIABLES.items():
        node = await line.add_variable(
            ua.NodeId(f"Line1.{name}", ns), ua.QualifiedName(name, ns), ua.Variant(value, kind)
        )
        nodes[name] = (node, kind)

    async def write(name: str, value, status=ua.StatusCodes.Good, source_ms=None):
        node, kind = nodes[name]
        ts = stamp(source_ms)
        dv = ua.DataValue(
            ua.Variant(value, kind),
            StatusCode=ua.StatusCode(status),
            SourceTimestamp=ts,
            ServerTimestamp=dt.datetime.now(dt.timezone.utc),
        )
        await server.write_attribute_value(node.nodeid, dv)

    load_nodes = []
    if args.load:
        load = await server.nodes.objects.add_object(ua.NodeId("Load", ns), ua.QualifiedName("Load", ns))
        for i in range(args.load):
            load_nodes.append(
                await load.add_variable(
                    ua.NodeId(f"Load.{i}", ns), ua.QualifiedName(f"L{i}", ns),
                    ua.Variant(0.0, ua.VariantType.Double),
                )
            )

    last = {name: value for name, (_, value) in VARIABLES.items()}
    async with server:
        print(f"ready {endpoint}", flush=True)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while True:
            raw = await reader.readline()
            if not raw:
                break
            line_text = raw.decode().strip()
            if not line_text:
                continue
            parts = line_text.split()
            try:
                if parts[0] == "set":
                    name = parts[1]
                    value = parse(nodes[name][1], parts[2])
                    last[name] = value
                    await write(name, value, source_ms=parts[3] if len(parts) > 3 else None)
                elif parts[0] == "bad":
                    name = parts[1]
                    await write(
                        name, last[name], status=ua.StatusCodes.BadSensorFailure,
                        source_ms=parts[2] if len(parts) > 2 else None,
                    )
                elif parts[0] == "uncertain":
                    name = parts[1]
                    value = parse(nodes[name][1], parts[2])
                    await write(
                        name, value, status=ua.StatusCodes.UncertainLastUsableValue,
                        source_ms=parts[3] if len(parts) > 3 else None,
                    )
                elif parts[0] == "tick":
                    n, period = int(parts[1]), int(parts[2])
                    for _ in range(n):
                        last["Temperature"] = float(last["Temperature"]) + 0.5
                        last["Count"] = int(last["Count"]) + 1
                        await write("Temperature", last["Temperature"])
                        await write("Count", last["Count"])
                        await asyncio.sleep(period / 1000.0)
                elif parts[0] == "load":
                    rounds, period = int(parts[1]), int(parts[2])
                    started = loop.time()
                    written = 0
                    for r in range(rounds):
                        due = started + r * period / 1000.0
                        await asyncio.sleep(max(0.0, due - loop.time()))
                        now = dt.datetime.now(dt.timezone.utc)
                        for i, node in enumerate(load_nodes):
                            dv = ua.DataValue(
                                ua.Variant(float(r * 1000 + i), ua.VariantType.Double),
                                SourceTimestamp=now, ServerTimestamp=now,
                            )
                            await server.write_attribute_value(node.nodeid, dv)
                            written += 1
                    print(f"ok {line_text} written={written} seconds={loop.time() - started:.3f}", flush=True)
                    continue
                else:
                    print(f"error unknown command {parts[0]}", flush=True)
                    continue
            except (KeyError, IndexError, ValueError) as exc:
                print(f"error {line_text}: {exc}", flush=True)
                continue
            print(f"ok {line_text}", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
