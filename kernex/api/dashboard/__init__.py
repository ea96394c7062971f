"""The web dashboard: a static single-page app on the API's origin, and its live events stream."""
