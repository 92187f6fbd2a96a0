"""WSGI entry point: the Django application wrapped in CacheFetch.

    cd examples/django_site && gunicorn -c ../gunicorn.conf.py mysite.wsgi:application
"""
import os
import tempfile

from django.core.wsgi import get_wsgi_application

from cachefetch import CacheFetch

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "mysite.settings")

store = os.environ.get("CACHEFETCH_STORE", os.path.join(tempfile.gettempdir(), "cachefetch-django-example"))
application = CacheFetch(get_wsgi_application(), store=store)
