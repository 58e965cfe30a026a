from django.apps import AppConfig


class DicomwebConfig(AppConfig):
    default_auto_field = "django.db.models.BigAutoField"
    name = "dicomweb"
    verbose_name = "DICOMweb"
