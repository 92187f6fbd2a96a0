from django.urls import path

from . import views

urlpatterns = [
    path("report/<str:name>", views.report),
    path("whoami", views.whoami),
]
