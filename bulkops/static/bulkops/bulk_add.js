/*
 * The add-bulk-operation page: show only the rows that belong to the target and the template
 * chosen (a row marked `data-shown-when="NAME=VALUE"` shows while the field NAME has VALUE).
 * Without this script every row shows and the server still reads only the chosen ones.
 */
(function () {
  'use strict';

  function value(form, name) {
    var fields = form.querySelectorAll('[name="' + name + '"]');
    for (var i = 0; i < fields.length; i++) {
      if (fields[i].type !== 'radio' || fields[i].checked) return fields[i].value;
    }
    return '';
  }

  function update(form) {
    var rows = form.querySelectorAll('[data-shown-when]');
    for (var i = 0; i < rows.length; i++) {
      var rule = rows[i].getAttribute('data-shown-when').split('=');
      rows[i].hidden = value(form, rule[0]) !== rule[1];
    }
  }

  function start() {
    var form = document.getElementById('bulkoperation_form');
    if (!form) return;
    form.addEventListener('change', function () { update(form); });
    update(form);
  }

  if (document.readyState === 'loading') document.addEventListener('DOMContentLoaded', start);
  else start();
})();
