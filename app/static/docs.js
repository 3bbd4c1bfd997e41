// Swagger UI for /openapi.json, from files served by this service (no CDN, no inline script:
// the page's Content-Security-Policy allows scripts from this origin only).
window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  deepLinking: true,
  validatorUrl: null, // the public validator badge would call out to the internet
  presets: [SwaggerUIBundle.presets.apis],
  layout: "BaseLayout",
});
