// Browser-side harness for tests/test_web_sdk.py.
//
// Initialises the official mParticle web SDK (loaded by index.html from
// node_modules) against an idmesh server and exposes promise-returning
// helpers on window.idmesh.  Every identity helper resolves with a plain
// object summarising what the SDK callback reported:
//   {httpCode, mpid, isLoggedIn, previousMpid, body, identities}
// so the Python side can assert on it through page.evaluate().
(function () {
    'use strict';

    var params = new URLSearchParams(window.location.search);
    var apiKey = params.get('key');
    var apiHost = params.get('api');           // "127.0.0.1:PORT", no scheme
    var autostart = params.get('autostart') !== '0';

    // Everything the SDK logs goes to the console (captured by the test) and
    // to an in-page buffer that the test can read after a failure.
    var logLines = [];
    function record(level, msg) {
        var line = '[' + level + '] ' + msg;
        logLines.push(line);
        if (logLines.length > 2000) {
            logLines.shift();
        }
        var pre = document.getElementById('log');
        if (pre) {
            pre.textContent += line + '\n';
        }
    }
    var sdkLogger = {
        verbose: function (msg) { record('verbose', msg); console.debug('[mParticle] ' + msg); },
        warning: function (msg) { record('warning', msg); console.warn('[mParticle] ' + msg); },
        error: function (msg) { record('error', msg); console.error('[mParticle] ' + msg); }
    };

    function summarizeUser(user) {
        if (!user) {
            return {mpid: null, isLoggedIn: null, identities: null};
        }
        var ids = null;
        try {
            ids = user.getUserIdentities().userIdentities;
        } catch (e) {
            ids = null;
        }
        return {mpid: user.getMPID(), isLoggedIn: user.isLoggedIn(), identities: ids};
    }

    // Turns an identity callback result into plain JSON-serialisable data.
    function summarizeIdentityResult(result) {
        var summary = {httpCode: result.httpCode, body: result.body === undefined ? null : result.body};
        var user = null;
        try {
            user = result.getUser ? result.getUser() : null;
        } catch (e) {
            summary.getUserError = String(e);
        }
        var u = summarizeUser(user);
        summary.mpid = u.mpid;
        summary.isLoggedIn = u.isLoggedIn;
        summary.identities = u.identities;
        var previous = null;
        try {
            previous = result.getPreviousUser ? result.getPreviousUser() : null;
        } catch (e) {
            previous = null;
        }
        summary.previousMpid = previous ? previous.getMPID() : null;
        return summary;
    }

    // Wraps one SDK identity call in a promise with a bounded wait.
    function identityCall(name, invoke, timeoutMs) {
        return new Promise(function (resolve, reject) {
            var done = false;
            var timer = setTimeout(function () {
                if (!done) {
                    done = true;
                    reject(new Error('idmesh harness: ' + name + ' callback not called within ' + timeoutMs + ' ms'));
                }
            }, timeoutMs || 10000);
            try {
                invoke(function (result) {
                    if (done) {
                        return;
                    }
                    done = true;
                    clearTimeout(timer);
                    var summary = summarizeIdentityResult(result);
                    summary.method = name;
                    record('harness', name + ' -> ' + JSON.stringify(summary));
                    resolve(summary);
                });
            } catch (e) {
                done = true;
                clearTimeout(timer);
                reject(e);
            }
        });
    }

    var startupResolve;
    var startupReject;
    var startup = new Promise(function (resolve, reject) {
        startupResolve = resolve;
        startupReject = reject;
    });

    function buildConfig(extra) {
        var config = {
            isDevelopmentMode: true,
            logLevel: 'verbose',
            logger: sdkLogger,
            requestConfig: false,
            forceHttps: true,
            identityUrl: apiHost + '/v1/',
            aliasUrl: apiHost + '/v1/identity/',
            v3SecureServiceUrl: apiHost + '/v3/JS/',
            configUrl: apiHost + '/JS/v2/',
            identityCallback: function (result) {
                var summary = summarizeIdentityResult(result);
                summary.method = 'identify(startup)';
                record('harness', 'startup identify -> ' + JSON.stringify(summary));
                startupResolve(summary);
            }
        };
        if (extra) {
            Object.keys(extra).forEach(function (k) { config[k] = extra[k]; });
        }
        return config;
    }

    var api = {
        apiKey: apiKey,
        apiHost: apiHost,
        // Resolves with the start-up identify result (the SDK runs identify
        // itself during init; identityCallback reports it).
        ready: startup,

        start: function (extraConfig) {
            if (!apiKey || !apiHost) {
                startupReject(new Error('idmesh harness: ?key= and ?api= are required'));
                return startup;
            }
            try {
                window.mParticle.init(apiKey, buildConfig(extraConfig));
            } catch (e) {
                startupReject(e);
            }
            return startup;
        },

        currentUser: function () {
            return summarizeUser(window.mParticle.Identity.getCurrentUser());
        },

        identify: function (userIdentities) {
            return identityCall('identify', function (cb) {
                window.mParticle.Identity.identify({userIdentities: userIdentities || {}}, cb);
            });
        },

        // login({email, customerid}) -- any IDSync identity keys are accepted.
        login: function (userIdentities) {
            return identityCall('login', function (cb) {
                window.mParticle.Identity.login({userIdentities: userIdentities || {}}, cb);
            });
        },

        // modify(newEmail) keeps the current user's other identities, as an
        // app would; modify({..}) sends exactly the given identities.
        modify: function (arg) {
            var userIdentities;
            if (typeof arg === 'string') {
                var current = window.mParticle.Identity.getCurrentUser();
                userIdentities = {};
                var existing = current ? current.getUserIdentities().userIdentities : {};
                Object.keys(existing || {}).forEach(function (k) { userIdentities[k] = existing[k]; });
                userIdentities.email = arg;
            } else {
                userIdentities = arg || {};
            }
            return identityCall('modify', function (cb) {
                window.mParticle.Identity.modify({userIdentities: userIdentities}, cb);
            });
        },

        logout: function (userIdentities) {
            return identityCall('logout', function (cb) {
                window.mParticle.Identity.logout({userIdentities: userIdentities || {}}, cb);
            });
        },

        // alias(sourceMpid, destinationMpid) through createAliasRequest +
        // aliasUsers; resolves {httpCode, message, request}.
        alias: function (sourceMpid, destinationMpid) {
            return new Promise(function (resolve, reject) {
                var identity = window.mParticle.Identity;
                var source = identity.getUser(String(sourceMpid));
                var destination = identity.getUser(String(destinationMpid));
                if (!source || !destination) {
                    reject(new Error('idmesh harness: alias users not in SDK storage: ' +
                        sourceMpid + ' -> ' + destinationMpid));
                    return;
                }
                var request = identity.createAliasRequest(source, destination);
                if (!request) {
                    reject(new Error('idmesh harness: createAliasRequest returned null'));
                    return;
                }
                var done = false;
                var timer = setTimeout(function () {
                    if (!done) {
                        done = true;
                        reject(new Error('idmesh harness: alias callback not called within 10000 ms'));
                    }
                }, 10000);
                identity.aliasUsers(request, function (result) {
                    if (done) {
                        return;
                    }
                    done = true;
                    clearTimeout(timer);
                    var summary = {
                        method: 'alias',
                        httpCode: result.httpCode,
                        message: result.message === undefined ? null : result.message,
                        request: request
                    };
                    record('harness', 'alias -> ' + JSON.stringify(summary));
                    resolve(summary);
                });
            });
        },

        // Event hooks for later tests (uploads go to {v3SecureServiceUrl}{key}/events).
        logEvent: function (name, attrs) {
            window.mParticle.logEvent(name, window.mParticle.EventType.Other, attrs || {});
        },
        logPageView: function (name, attrs) {
            window.mParticle.logPageView(name || 'harness page', attrs || {});
        },
        upload: function () {
            window.mParticle.upload();
        },
        // setUserAttribute(name, value) on the current user; an array goes
        // through setUserAttributeList.  Returns all the user's attributes.
        setUserAttribute: function (name, value) {
            var user = window.mParticle.Identity.getCurrentUser();
            if (!user) {
                throw new Error('idmesh harness: no current user to set ' + name + ' on');
            }
            if (Array.isArray(value)) {
                user.setUserAttributeList(name, value);
            } else {
                user.setUserAttribute(name, value);
            }
            return user.getAllUserAttributes();
        },

        logs: function () {
            return logLines.slice();
        }
    };

    window.idmesh = api;
    if (autostart) {
        api.start();
    }
})();
