"""The ceiling the product's REST API is measured against: what DRF gives with no extra work.

Stock `CreateAPIView` / `RetrieveAPIView` with a stock `ModelSerializer` on the product's own models
(same tables, same indexes, same rows inserted), and DRF's stock classes spelled out so the
product's REST_FRAMEWORK settings do not apply: no authentication (the Authorization header the
bench sends is ignored), `AllowAny`, `JSONParser`, `JSONRenderer` (the json module), DRF's default
content negotiation and exception handling. No realtime event, no agent resolution, no role check:
the product does all of these on top."""

from __future__ import annotations

from rest_framework import generics, serializers
from rest_framework.negotiation import DefaultContentNegotiation
from rest_framework.parsers import JSONParser
from rest_framework.permissions import AllowAny
from rest_framework.renderers import JSONRenderer

from devicecontrol.models import Operation
from inventory.models import ManagedObject


class OperationSerializer(serializers.ModelSerializer):
    class Meta:
        model = Operation
        # The row the product's create inserts: device, agent, PENDING, times, fragments, expiry.
        fields = ["id", "device", "agent_id", "status", "creation_time", "fragments", "expires_at"]
        read_only_fields = ["id", "status", "creation_time"]


class ManagedObjectSerializer(serializers.ModelSerializer):
    class Meta:
        model = ManagedObject
        fields = [
            "id",
            "name",
            "type",
            "owner",
            "creation_time",
            "last_updated",
            "fragments",
            "is_device",
        ]
        read_only_fields = ["id", "creation_time", "last_updated"]


class BareView:
    authentication_classes: list[type] = []
    permission_classes = [AllowAny]
    parser_classes = [JSONParser]
    renderer_classes = [JSONRenderer]
    content_negotiation_class = DefaultContentNegotiation
    throttle_classes: list[type] = []

    def get_exception_handler(self):  # type: ignore[no-untyped-def]
        from rest_framework.views import exception_handler

        return exception_handler


class OperationCreate(BareView, generics.CreateAPIView):
    queryset = Operation.objects.all()
    serializer_class = OperationSerializer


class ManagedObjectCreate(BareView, generics.CreateAPIView):
    queryset = ManagedObject.objects.all()
    serializer_class = ManagedObjectSerializer


class ManagedObjectRetrieve(BareView, generics.RetrieveAPIView):
    queryset = ManagedObject.objects.all()
    serializer_class = ManagedObjectSerializer
