"""An app's view of the proxy: the Python clients apps actually use, with no credentials.

Usage: python_clients.py http://127.0.0.1:PORT
Prints one JSON object with what each client observed; the Rust test asserts on it.
"""
import asyncio
import json
import sys

import httpx
import websockets

base = sys.argv[1]
result = {}

with httpx.Client(base_url=base, timeout=10) as client:
    r = client.post("/waves/v1/lightning-v2/get_speech", json={"text": "hi", "voice_id": "emily"})
    result["post_status"] = r.status_code
    result["post_body"] = r.json()
    r = client.request("CONNECT", "/")
    result["connect_status"] = r.status_code
    result["connect_code"] = r.json().get("code")


async def ws():
    url = base.replace("http://", "ws://") + "/waves/v1/tts/live"
    async with websockets.connect(url) as conn:
        await conn.send("hello")
        result["ws_echo"] = await conn.recv()
        await conn.send(b"\x00\x01\x02")
        result["ws_binary"] = list(await conn.recv())
        await conn.close(code=4002, reason="bye")
    result["ws_close_code"] = conn.close_code


asyncio.run(ws())
print(json.dumps(result))
