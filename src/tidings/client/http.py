"""``tidings.HTTPClient``: the HTTP API for backends (publish, broadcast, history, channels)."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson

from ..protocol import Publication, StreamPosition

__all__ = ["ApiError", "HTTPClient"]


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class HTTPClient:
    """``async with HTTPClient("http://127.0.0.1:8888", api_key) as api: await api.publish(ch, data)``."""

    def __init__(
        self, base_url: str = "http://127.0.0.1:8888", api_key: str = "", *, timeout: float = 30
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}"}
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> HTTPClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _call(
        self, method: str, path: str, body: Any = None, params: dict[str, str] | None = None
    ) -> Any:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        data = None if body is None else orjson.dumps(body)
        headers = dict(self._headers)
        if data is not None:
            headers["Content-Type"] = "application/json"
        async with self._session.request(
            method, self.base_url + path, data=data, headers=headers, params=params
        ) as resp:
            raw = await resp.read()
            try:
                obj = orjson.loads(raw)
            except orjson.JSONDecodeError:
                raise ApiError(resp.status, "bad_response", raw[:200].decode(errors="replace")) from None
            if resp.status >= 400:
                err = obj.get("error", {}) if isinstance(obj, dict) else {}
                raise ApiError(resp.status, err.get("code", "unknown"), err.get("message", ""))
            return obj

    async def publish(self, channel: str, data: Any, info: dict[str, Any] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"channel": channel, "data": data}
        if info is not None:
            body["info"] = info
        result: dict[str, Any] = await self._call("POST", "/api/publish", body)
        return result

    async def broadcast(self, channels: list[str], data: Any) -> list[dict[str, Any]]:
        result = await self._call("POST", "/api/broadcast", {"channels": channels, "data": data})
        out: list[dict[str, Any]] = result["results"]
        return out

    async def history(
        self, channel: str, *, limit: int | None = None, since: StreamPosition | None = None
    ) -> tuple[list[Publication], StreamPosition, bool | None]:
        params: dict[str, str] = {}
        if limit is not None:
            params["limit"] = str(limit)
        if since is not None:
            params["since"] = str(since.offset)
            params["epoch"] = since.epoch
        r = await self._call("GET", f"/api/channels/{channel}/history", params=params)
        return (
            [Publication.from_json(p) for p in r["publications"]],
            StreamPosition(r["offset"], r["epoch"]),
            r.get("recovered"),
        )

    async def presence(self, channel: str) -> list[dict[str, Any]]:
        """The clients subscribed to ``channel``: ``[{"client", "user"}, ...]``."""
        r = await self._call("GET", f"/api/channels/{channel}/presence")
        clients: list[dict[str, Any]] = r["clients"]
        return clients

    async def channels(self) -> dict[str, int]:
        r = await self._call("GET", "/api/channels")
        return {c["channel"]: c["subscribers"] for c in r["channels"]}

    async def health(self) -> dict[str, Any]:
        result: dict[str, Any] = await self._call("GET", "/healthz")
        return result
