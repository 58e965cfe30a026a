from django.urls import path

from routing import api

urlpatterns = [
    path("instances", api.InstanceUploadView.as_view(), name="instance-upload"),
    path("deliveries", api.DeliveryListView.as_view(), name="delivery-list"),
    path("deliveries/ack", api.DeliveryBatchAckView.as_view(), name="delivery-batch-ack"),
    path("deliveries/<int:delivery_id>/file", api.DeliveryFileView.as_view(), name="delivery-file"),
    path("deliveries/<int:delivery_id>/ack", api.DeliveryAckView.as_view(), name="delivery-ack"),
]
