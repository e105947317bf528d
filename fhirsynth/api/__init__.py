"""FHIR REST API: create_app() (fhirsynth.api.app) and a mountable router (fhirsynth.api.router.build_router).

Never imports torch: the $synthesize path imports the model lazily.
"""
