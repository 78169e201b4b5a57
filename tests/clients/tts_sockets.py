"""Live-TTS WebSocket clients, as a voice agent writes them with `websockets`.

Usage: tts_sockets.py WS_URL SOCKETS SYNTHESES
Opens SOCKETS sockets at once; on each, runs SYNTHESES syntheses one after another (send a
text message, read until `complete` or `error`). Prints JSON: completed syntheses, the error
frames seen, audio chunks, and the close codes.
"""
import asyncio
import json
import sys

import websockets


async def one_socket(url, n, results):
    async with websockets.connect(url) as ws:
        for i in range(n):
            await ws.send(json.dumps({"voice_id": "emily", "text": f"hello {i}"}))
            while True:
                reply = json.loads(await ws.recv())
                status = reply.get("status")
                if status == "chunk":
                    results["chunks"] += 1
                elif status == "complete":
                    results["complete"] += 1
                    break
                elif status == "error":
                    results["errors"].append(reply)
                    break
        results["extensions"].append(ws.response.headers.get("Sec-WebSocket-Extensions"))


async def main():
    url, sockets, syntheses = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    results = {"complete": 0, "chunks": 0, "errors": [], "extensions": []}
    await asyncio.gather(*(one_socket(url, syntheses, results) for _ in range(sockets)))
    print(json.dumps(results))


asyncio.run(main())
