// The send-operation page: show only the fields of the chosen operation.
"use strict";
(function () {
  const form = document.getElementById("send-operation-form");
  if (!form) return;
  function update() {
    const chosen = form.querySelector('input[name="template"]:checked');
    const value = chosen ? chosen.value : "";
    form.querySelectorAll("fieldset[data-template]").forEach(function (fieldset) {
      const name = fieldset.dataset.template;
      // A fieldset with an error stays visible, whatever is chosen.
      fieldset.hidden = name !== "" && name !== value && !fieldset.querySelector(".errorlist");
    });
  }
  form.addEventListener("change", update);
  // One click, one operation: a second click while the first is being sent does nothing.
  form.addEventListener("submit", function (event) {
    if (form.dataset.sending) event.preventDefault();
    form.dataset.sending = "1";
  });
  window.addEventListener("pageshow", function () {
    delete form.dataset.sending; // back to this page (browser cache): it may send again
  });
  update();
})();
