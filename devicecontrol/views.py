"""Device-control REST resources. The operations collection arrives with the operations issue."""

from __future__ import annotations

from typing import Any

from rest_framework.response import Response

from deviceplatform.api.media_types import MediaType
from deviceplatform.api.views import CumulocityView
from deviceplatform.roles import Role
from devicecontrol.serializers import devicecontrol_api_json


class DeviceControlApiView(CumulocityView):
    required_roles = {"GET": frozenset({Role.DEVICE_CONTROL_READ})}

    def get(self, request: Any) -> Response:
        base = request.build_absolute_uri("/").rstrip("/")
        return self.respond(devicecontrol_api_json(base), MediaType.DEVICE_CONTROL_API)
