from django.apps import AppConfig


class RoutingConfig(AppConfig):
    name = "routing"
    verbose_name = "Routing and delivery"

    def ready(self) -> None:
        from routing import notify

        notify.connect_signals()
