// The API reference at /api/v1/docs: Swagger UI from npm, bundled here so the page loads nothing from a CDN
// and runs no inline script (the API's Content-Security-Policy allows neither).
import "swagger-ui-dist/swagger-ui.css";
import SwaggerUIBundle from "swagger-ui-dist/swagger-ui-bundle.js";

SwaggerUIBundle({
  url: document.body.dataset.openapi,
  dom_id: "#swagger-ui",
  deepLinking: true,
  validatorUrl: null, // the public validator would send the document to a third party
  presets: [SwaggerUIBundle.presets.apis],
  layout: "BaseLayout",
});
