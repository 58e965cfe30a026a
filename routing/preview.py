"""The admin's subscription preview: which centers would receive a key, and through which pattern."""

from django import forms
from django.template.response import TemplateResponse

from centers.models import Center, City, Modality
from routing.models import Subscription
from routing.patterns import SubscriptionRef, route, routing_key


class PreviewForm(forms.Form):
    city = forms.ModelChoiceField(queryset=City.objects.select_related("region"), required=False)
    modality = forms.ModelChoiceField(queryset=Modality.objects.all(), required=False, to_field_name="code")
    key = forms.CharField(required=False, label="or a routing key", help_text="e.g. fars.shiraz.ct")
    publisher = forms.ModelChoiceField(
        queryset=Center.objects.filter(may_publish=True),
        required=False,
        help_text="Optional: a center never receives its own uploads.",
    )

    def clean(self):
        data = super().clean()
        if data.get("key"):
            data["routing_key"] = data["key"].strip().lower()
        elif data.get("city") and data.get("modality"):
            city = data["city"]
            data["routing_key"] = routing_key(region=city.region.slug, city=city.slug, modality=data["modality"].code)
        else:
            raise forms.ValidationError("Pick a city and a modality, or type a routing key.")
        return data


def subscription_preview(*, key: str, publisher: Center | None = None) -> list[tuple[Center, list[str]]]:
    """Every center the key would reach now, with the active patterns that match, as the fan-out decides."""
    active = Subscription.objects.filter(is_active=True, center__is_active=True, center__may_subscribe=True)
    refs = [
        SubscriptionRef(subscription_id=pk, center_id=c, pattern=p)
        for pk, c, p in active.values_list("pk", "center_id", "pattern")
    ]
    matches = route(key, refs, exclude_center_id=publisher.pk if publisher else None)
    centers = Center.objects.in_bulk({m.center_id for m in matches})
    by_center: dict[int, list[str]] = {}
    for match in matches:
        by_center.setdefault(match.center_id, []).append(match.pattern)
    return sorted(((centers[c], sorted(p)) for c, p in by_center.items()), key=lambda row: row[0].name)


def subscription_preview_view(model_admin):
    def view(request):
        form = PreviewForm(request.GET or None)
        result = None
        if form.is_valid():
            result = {
                "key": form.cleaned_data["routing_key"],
                "rows": subscription_preview(
                    key=form.cleaned_data["routing_key"], publisher=form.cleaned_data["publisher"]
                ),
            }
        context = {
            **model_admin.admin_site.each_context(request),
            "opts": model_admin.model._meta,
            "title": "Subscription preview",
            "form": form,
            "result": result,
        }
        return TemplateResponse(request, "admin/routing/subscription/preview.html", context)

    return view
