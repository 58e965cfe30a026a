"""API authentication: a center's key presented as a bearer token."""

from dataclasses import dataclass

from rest_framework import authentication, exceptions, permissions

from centers.models import ApiKey, Center
from centers.selectors import apikey_get_active
from centers.services import apikey_touch


@dataclass(frozen=True)
class CenterAgent:
    """The caller of the agent API: whoever holds one of a center's keys."""

    center: Center
    api_key: ApiKey
    is_authenticated: bool = True
    is_anonymous: bool = False


class CenterKeyAuthentication(authentication.BaseAuthentication):
    keyword = "Bearer"

    def authenticate(self, request):
        header = authentication.get_authorization_header(request).split()
        if not header or header[0].lower() != self.keyword.lower().encode():
            return None
        if len(header) != 2:
            raise exceptions.AuthenticationFailed("The Authorization header must be 'Bearer <key>'.")
        try:
            secret = header[1].decode("ascii")
        except UnicodeDecodeError:
            raise exceptions.AuthenticationFailed("The API key is not valid.") from None
        api_key = apikey_get_active(secret=secret)
        if api_key is None:
            raise exceptions.AuthenticationFailed("The API key is unknown or revoked.")
        apikey_touch(api_key=api_key)
        return CenterAgent(center=api_key.center, api_key=api_key), api_key

    def authenticate_header(self, request):
        # Makes DRF answer 401 (not 403) when no key is presented.
        return self.keyword


class IsCenterAgent(permissions.BasePermission):
    message = "An API key (Authorization: Bearer <key>) is required."

    def has_permission(self, request, view):
        return isinstance(request.user, CenterAgent)


class MayPublish(permissions.BasePermission):
    message = "This center is not allowed to publish images."

    def has_permission(self, request, view):
        return isinstance(request.user, CenterAgent) and request.user.center.may_publish


class MaySubscribe(permissions.BasePermission):
    message = "This center is not allowed to receive images."

    def has_permission(self, request, view):
        return isinstance(request.user, CenterAgent) and request.user.center.may_subscribe
